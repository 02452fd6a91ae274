//! ingest-gateway against the real broker: what reaches Kafka is what was sent, concurrency
//! never mixes hits up, a broker outage gives 503s and never a 2xx, SIGTERM loses no
//! acknowledged hit, a catalogue change applies while requests flow, and HTTP/2 (h2c) is
//! served only when turned on.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hookpipe_tests::{
    PrivateBroker, Servers, Wiring, consume_envelopes, consume_until_seen, eventually, metric,
    repo_root, unique,
};

const STREAM: &str = "522ed95e-9f07-45f6-a0b7-28bf2d0315e5";

fn examples() -> PathBuf {
    repo_root().join("examples/streams.yaml")
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Option<String>) {
    match client
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let hit_id = json["hit_id"].as_str().map(str::to_owned);
            assert!(
                status != 202 || hit_id.is_some(),
                "202 without a hit_id: {text:?}"
            );
            (status, hit_id)
        }
        Err(_) => (0, None),
    }
}

#[tokio::test]
async fn every_body_kind_reaches_kafka_byte_for_byte() {
    let wiring = Wiring::new(examples(), 3).await;
    let gateway = wiring.gateway(&[]).await;
    let url = format!("{}/ds/{STREAM}", gateway.url);
    let client = reqwest::Client::new();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("application/x-www-form-urlencoded", b"orderId=N1&status=delivered&total=120.13&userId=U1".to_vec()),
        ("application/json", br#"{"orderId":"N2","status":"refunded","total":96.12,"tags":["a","b"]}"#.to_vec()),
        ("application/json; charset=utf-8", "{\"name\":\"Jos\u{e9} \u{1F600}\",\"city\":\"\u{41C}\u{43E}\u{441}\u{43A}\u{432}\u{430}\"}".as_bytes().to_vec()),
        ("application/xml", b"<?xml version=\"1.0\"?>\n<order id=\"N3\"><status>received</status></order>\r\n".to_vec()),
        ("text/plain; charset=us-ascii", b"  leading and trailing spaces, tabs\t and\nnewlines  \n".to_vec()),
        ("application/octet-stream", b"status=shipped&note=%26%3D%20".to_vec()),
    ];
    let mut sent = Vec::new();
    for (content_type, body) in &bodies {
        let (status, hit_id) = post(&client, &url, content_type, body.clone()).await;
        assert_eq!(status, 202, "{content_type}");
        sent.push((hit_id.unwrap(), *content_type, body.clone()));
    }
    let query = "orderId=N4&status=lead&utm_source=a%20b&x=1&x=2";
    let response = client
        .get(format!("{url}?{query}"))
        .header("user-agent", "postback-tool/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let get_hit: serde_json::Value = response.json().await.unwrap();

    let records = consume_envelopes(
        &wiring.servers.brokers,
        &wiring.topic,
        bodies.len() + 1,
        Duration::from_secs(20),
    )
    .await;
    for (hit_id, content_type, body) in &sent {
        let (key, envelope) = records.iter().find(|(_, e)| &e.hit_id == hit_id).unwrap();
        assert_eq!(key, hit_id.as_bytes(), "Kafka key is the hit_id");
        assert_eq!(
            &envelope.payload[..],
            &body[..],
            "{content_type}: payload byte for byte"
        );
        assert_eq!(envelope.content_type, *content_type);
        assert_eq!(envelope.method, "POST");
        assert_eq!(envelope.stream_id, STREAM);
        assert!(
            envelope.remote_addr.starts_with("127.0.0.1:"),
            "{}",
            envelope.remote_addr
        );
    }
    let (_, envelope) = records
        .iter()
        .find(|(_, e)| e.hit_id == get_hit["hit_id"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        &envelope.payload[..],
        query.as_bytes(),
        "GET payload is the raw query string"
    );
    assert_eq!(envelope.method, "GET");
    assert_eq!(envelope.user_agent, "postback-tool/1.0");
}

#[tokio::test]
async fn a_thousand_concurrent_requests_give_a_thousand_distinct_envelopes() {
    let wiring = Wiring::new(examples(), 4).await;
    let gateway = wiring.gateway(&[]).await;
    let url = Arc::new(format!("{}/ds/{STREAM}", gateway.url));
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let body = format!("orderId=N{i}&status=delivered");
            let (status, hit_id) = post(
                &client,
                &url,
                "application/x-www-form-urlencoded",
                body.clone().into_bytes(),
            )
            .await;
            (status, hit_id, body)
        });
    }
    let mut acknowledged = std::collections::HashMap::new();
    while let Some(result) = tasks.join_next().await {
        let (status, hit_id, body) = result.unwrap();
        assert_eq!(status, 202);
        assert!(
            acknowledged.insert(hit_id.unwrap(), body).is_none(),
            "hit_id returned twice"
        );
    }
    let records = consume_envelopes(
        &wiring.servers.brokers,
        &wiring.topic,
        1000,
        Duration::from_secs(60),
    )
    .await;
    let ids: HashSet<&str> = records.iter().map(|(_, e)| e.hit_id.as_str()).collect();
    assert_eq!(ids.len(), 1000, "hit_ids are unique");
    for (_, envelope) in &records {
        let body = acknowledged
            .get(&envelope.hit_id)
            .expect("every envelope was acknowledged");
        assert_eq!(
            &envelope.payload[..],
            body.as_bytes(),
            "each envelope carries its own request's body"
        );
    }
}

#[tokio::test]
async fn broker_outage_gives_503_never_2xx_and_recovers_without_restart() {
    let mut broker = PrivateBroker::start().await;
    let servers = Servers {
        brokers: broker.brokers(),
        ..Servers::from_env()
    };
    let wiring = Wiring::on(servers, examples(), 1).await;
    let gateway = wiring.gateway(&[("HOOKPIPE_PUBLISH_TIMEOUT", "1s")]).await;
    let url = format!("{}/ds/{STREAM}", gateway.url);
    let client = reqwest::Client::new();
    let form = "application/x-www-form-urlencoded";
    assert_eq!(post(&client, &url, form, b"before=1".to_vec()).await.0, 202);

    broker.stop();
    for i in 0..5 {
        let started = Instant::now();
        let response = client
            .post(&url)
            .header("content-type", form)
            .body(format!("during={i}"))
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), 503, "request {i} during the outage");
        assert_eq!(response.headers()["retry-after"], "1");
        // The publish timeout is 1 s; the answer may not take much longer.
        assert!(took < Duration::from_secs(3), "503 took {took:?}");
    }
    let readyz = format!("{}/readyz", gateway.admin);
    eventually(
        Duration::from_secs(10),
        "/readyz to turn 503 while the broker is down",
        || {
            let r = reqwest::get(readyz.clone());
            async move { (r.await.ok()?.status() == 503).then_some(()) }
        },
    )
    .await;

    broker.resume().await;
    let client2 = client.clone();
    let hit = eventually(
        Duration::from_secs(30),
        "a 202 after the broker is back",
        || {
            let (client, url) = (client2.clone(), url.clone());
            async move {
                let (status, hit_id) = post(&client, &url, form, b"after=1".to_vec()).await;
                assert!(
                    status == 202 || status == 503,
                    "only 202 or 503, got {status}"
                );
                (status == 202).then(|| hit_id.unwrap())
            }
        },
    )
    .await;
    // Panics unless the hit acknowledged after recovery is in Kafka.
    consume_until_seen(
        &wiring.servers.brokers,
        &wiring.topic,
        &HashSet::from([hit]),
        Duration::from_secs(20),
    )
    .await;
}

#[tokio::test]
async fn sigterm_under_load_loses_no_acknowledged_request() {
    let wiring = Wiring::new(examples(), 4).await;
    let mut gateway = wiring.gateway(&[]).await;
    let url = Arc::new(format!("{}/ds/{STREAM}", gateway.url));
    let client = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (client, url, stop, count) = (client.clone(), url.clone(), stop.clone(), count.clone());
        workers.spawn(async move {
            let mut acknowledged = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (status, hit_id) = post(
                    &client,
                    &url,
                    "text/plain",
                    format!("w{w}-{i}").into_bytes(),
                )
                .await;
                match status {
                    202 => {
                        acknowledged.push(hit_id.unwrap());
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    // Refused connection once the listener is closed, or 503 while draining.
                    0 | 503 => tokio::time::sleep(Duration::from_millis(5)).await,
                    other => panic!("unexpected status {other}"),
                }
            }
            acknowledged
        });
    }
    eventually(
        Duration::from_secs(20),
        "some load to be acknowledged",
        || {
            let n = count.load(Ordering::Relaxed);
            async move { (n >= 300).then_some(()) }
        },
    )
    .await;
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.proc.terminate(Duration::from_secs(30));
        (status, gateway)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "gateway exited with {:?}", status.0);
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = HashSet::new();
    while let Some(result) = workers.join_next().await {
        acknowledged.extend(result.unwrap());
    }
    let total = acknowledged.len();
    assert!(total >= 300);
    // Read everything the topic holds (at least the acknowledged ones).
    let records = consume_envelopes(
        &wiring.servers.brokers,
        &wiring.topic,
        total,
        Duration::from_secs(60),
    )
    .await;
    let in_kafka: HashSet<String> = records.into_iter().map(|(_, e)| e.hit_id).collect();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|h| !in_kafka.contains(*h))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {total} acknowledged hits are not in Kafka",
        lost.len()
    );
}

#[tokio::test]
async fn a_catalogue_change_applies_while_requests_flow() {
    let dir = std::env::temp_dir().join(unique("hookpipe-catalogue"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("streams.yaml");
    let stream_a = STREAM;
    let stream_b = "6b1c8a52-2c7e-4b0e-8f1a-3d9e4c5b6a70";
    let entry = |id: &str, table: &str| {
        format!("  - id: {id}\n    table: local-project.reload_test.{table}\n    timezone: UTC\n")
    };
    std::fs::write(&path, format!("streams:\n{}", entry(stream_a, "a"))).unwrap();
    let wiring = Wiring::new(path.clone(), 2).await;
    let gateway = wiring.gateway(&[]).await;
    let client = reqwest::Client::new();
    let form = "application/x-www-form-urlencoded";
    let url_a = format!("{}/ds/{stream_a}", gateway.url);
    let url_b = format!("{}/ds/{stream_b}", gateway.url);
    assert_eq!(post(&client, &url_b, form, b"x=1".to_vec()).await.0, 404);

    // Requests to A keep flowing while the file changes under the gateway.
    let stop = Arc::new(AtomicBool::new(false));
    let flow = {
        let (client, stop, url_a) = (client.clone(), stop.clone(), url_a.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(post(&client, &url_a, form, b"a=1".to_vec()).await.0);
            }
            statuses
        })
    };
    // Replace atomically, as a ConfigMap update does.
    let write = |text: String| {
        let tmp = dir.join(".streams.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write(format!(
        "streams:\n{}{}",
        entry(stream_a, "a"),
        entry(stream_b, "b")
    ));
    eventually(Duration::from_secs(10), "stream B to be accepted", || {
        let (client, url) = (client.clone(), url_b.clone());
        async move { (post(&client, &url, form, b"b=1".to_vec()).await.0 == 202).then_some(()) }
    })
    .await;
    assert_eq!(
        metric(
            &gateway.admin,
            "ingest_gateway_catalogue_reloads_total",
            &[("outcome", "applied")]
        )
        .await,
        1.0
    );

    // An invalid version is refused; the one in force stays.
    write("streams:\n  - id: not-a-uuid\n    table: x\n    timezone: Mars\n".into());
    eventually(
        Duration::from_secs(10),
        "the invalid catalogue to be rejected",
        || {
            let admin = gateway.admin.clone();
            async move {
                (metric(
                    &admin,
                    "ingest_gateway_catalogue_reloads_total",
                    &[("outcome", "rejected")],
                )
                .await
                    >= 1.0)
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(post(&client, &url_b, form, b"b=2".to_vec()).await.0, 202);
    stop.store(true, Ordering::Relaxed);
    let statuses = flow.await.unwrap();
    assert!(
        statuses.len() > 5,
        "requests kept flowing: {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| *s == 202),
        "every request to A was accepted: {statuses:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn slow_or_silent_clients_are_cut_off_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let wiring = Wiring::new(examples(), 1).await;
    let gateway = wiring.gateway(&[("HOOKPIPE_HEADER_TIMEOUT", "1s")]).await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    // One trickles half a request line and stops; one connects and says nothing.
    let mut trickler = tokio::net::TcpStream::connect(&addr).await.unwrap();
    trickler
        .write_all(format!("POST /ds/{STREAM} HTTP/1.1\r\nHost: x\r\n").as_bytes())
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    for (name, stream) in [("trickling", &mut trickler), ("silent", &mut silent)] {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        // The server closes the connection (EOF or reset), possibly after a 408.
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(outcome.is_ok(), "{name} connection still open after 10 s");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name}: closed only after {:?}",
            started.elapsed()
        );
    }
    // The gateway still serves others.
    let client = reqwest::Client::new();
    assert_eq!(
        post(
            &client,
            &format!("{}/ds/{STREAM}", gateway.url),
            "text/plain",
            b"a=1".to_vec()
        )
        .await
        .0,
        202
    );
}

/// One POST over cleartext HTTP/2 with prior knowledge (h2c); the status and hit_id, or the
/// client's error when the gateway does not speak HTTP/2.
async fn post_h2c(url: &str, body: &'static str) -> Result<(u16, Option<String>), String> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let request = hyper::Request::post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .map_err(|_| "no answer in 10 s".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Ok((status, json["hit_id"].as_str().map(str::to_owned)))
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_only_when_turned_on() {
    let wiring = Wiring::new(examples(), 3).await;
    let client = reqwest::Client::new();

    // Default: HTTP/1.1 only. An h2c connection is closed without an answer, HTTP/1.1 works.
    let gateway = wiring.gateway(&[]).await;
    let url = format!("{}/ds/{STREAM}", gateway.url);
    let refused = post_h2c(&url, "orderId=H1&status=sent-over-h2c").await;
    assert!(
        refused.is_err(),
        "h2c answered with HTTP/2 off: {refused:?}"
    );
    let (status, http1_hit) = post(&client, &url, "text/plain", b"orderId=H0".to_vec()).await;
    assert_eq!(status, 202);

    // HOOKPIPE_HTTP2=true: the same port takes h2c and HTTP/1.1, and both hits reach Kafka.
    let both = wiring.gateway(&[("HOOKPIPE_HTTP2", "true")]).await;
    let url = format!("{}/ds/{STREAM}", both.url);
    let (status, h2_hit) = post_h2c(&url, "orderId=H2&status=sent-over-h2c")
        .await
        .unwrap();
    assert_eq!(status, 202);
    let (status, both_http1_hit) = post(&client, &url, "text/plain", b"orderId=H3".to_vec()).await;
    assert_eq!(status, 202);

    let hits: HashSet<String> = [http1_hit, h2_hit.clone(), both_http1_hit]
        .into_iter()
        .map(Option::unwrap)
        .collect();
    let records = consume_until_seen(
        &wiring.servers.brokers,
        &wiring.topic,
        &hits,
        Duration::from_secs(20),
    )
    .await;
    let (_, envelope) = records
        .iter()
        .find(|(_, e)| Some(&e.hit_id) == h2_hit.as_ref())
        .unwrap();
    assert_eq!(&envelope.payload[..], b"orderId=H2&status=sent-over-h2c");
    assert_eq!(envelope.method, "POST");
}
