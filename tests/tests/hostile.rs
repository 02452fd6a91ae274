//! Hostile input (issue #5): bad and abusive requests against a running gateway on the real
//! broker, each with the status a sender should get, spoken over raw TCP where a well-behaved
//! client library would refuse to send them. Afterwards the gateway must still be healthy,
//! still accept a normal webhook, and its memory must have stayed bounded.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use hookpipe_tests::{Gateway, Wiring, unique};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OPEN: &str = "0b7f3a52-9c1d-4e8a-b6f0-2d4c6e8a0b1c";
const SIGNED: &str = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b";
const BEARER: &str = "7c8d9e0f-1a2b-4c3d-9e4f-5a6b7c8d9e0f";
const SECRET: &str = "hostile-test-secret";
const TOKEN: &str = "hostile-test-token";

async fn gateway() -> Gateway {
    gateway_with(&[]).await
}

async fn gateway_with(extra: &[(&str, &str)]) -> Gateway {
    let dir = std::env::temp_dir().join(unique("hookpipe-hostile"));
    std::fs::create_dir_all(&dir).unwrap();
    let catalogue = dir.join("streams.yaml");
    std::fs::write(
        &catalogue,
        format!(
            "streams:
  - id: {OPEN}
    table: local-project.hostile.open
    timezone: UTC
  - id: {SIGNED}
    table: local-project.hostile.signed
    timezone: UTC
    auth:
      type: hmac-sha256
      prefix: \"sha256=\"
      timestamp_header: X-Timestamp
      secrets: [{{env: HOSTILE_SECRET}}]
  - id: {BEARER}
    table: local-project.hostile.bearer
    timezone: UTC
    auth:
      type: bearer
      secrets: [{{env: HOSTILE_TOKEN}}]
"
        ),
    )
    .unwrap();
    let wiring = Wiring::new(catalogue, 1).await;
    let mut env = vec![
        // Short, so the slow cases end quickly.
        ("HOOKPIPE_BODY_TIMEOUT", "2s"),
        ("HOOKPIPE_HEADER_TIMEOUT", "2s"),
        ("HOSTILE_SECRET", SECRET),
        ("HOSTILE_TOKEN", TOKEN),
    ];
    env.extend_from_slice(extra);
    wiring.gateway(&env).await
}

/// Sends `request` as raw bytes and returns the status of the first response, or `None` when
/// the gateway closed the connection without answering.
async fn raw(addr: &str, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The gateway may answer (413) and close before it has read everything: ignore that.
    let _ = stream.write_all(request).await;
    read_status(&mut stream).await
}

/// Reads one response's status line (waits at most 15 s).
async fn read_status(stream: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    line.split_whitespace().nth(1)?.parse().ok()
}

fn post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

fn sign(timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The gateway's resident memory, from /proc (kB).
fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

struct Case {
    name: &'static str,
    request: Vec<u8>,
    expected: Option<u16>,
}

fn case(name: &'static str, request: Vec<u8>, expected: Option<u16>) -> Case {
    Case {
        name,
        request,
        expected,
    }
}

/// The cases that are one request written at once.
fn one_shot_cases() -> Vec<Case> {
    let ok = b"orderId=N1&status=delivered";
    let open = format!("/ds/{OPEN}");
    let ts = now();
    let signed_body = "orderId=S1&status=paid";
    let mut cases = vec![
        case("a normal webhook", post(&open, "", ok), Some(202)),
        case(
            "oversized body with Content-Length",
            post(&open, "", &vec![b'a'; 2 * 1024 * 1024]),
            Some(413),
        ),
        case(
            "Content-Length far over the limit, no body",
            format!("POST {open} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
                .into_bytes(),
            Some(413),
        ),
        case(
            "oversized chunked body without Content-Length",
            {
                let mut r = format!(
                    "POST {open} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                .into_bytes();
                for _ in 0..40 {
                    r.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
                    r.extend_from_slice(&vec![b'a'; 64 * 1024]);
                    r.extend_from_slice(b"\r\n");
                }
                r.extend_from_slice(b"0\r\n\r\n");
                r
            },
            Some(413),
        ),
        case(
            "Expect: 100-continue with an oversized Content-Length",
            format!("POST {open} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000000\r\n\r\n")
                .into_bytes(),
            Some(413),
        ),
        case(
            "negative Content-Length",
            format!("POST {open} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nabc").into_bytes(),
            Some(400),
        ),
        case(
            "two different Content-Lengths",
            format!("POST {open} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde")
                .into_bytes(),
            Some(400),
        ),
        case(
            "invalid chunk size",
            format!("POST {open} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
                .into_bytes(),
            Some(400),
        ),
        case("invalid UTF-8 body", post(&open, "", b"orderId=\xff\xfe\xfd"), Some(400)),
        case("empty body", post(&open, "", b""), Some(400)),
        case(
            "a NUL byte in the body (valid UTF-8, stored as sent)",
            post(&open, "", b"orderId=N1\0&status=x"),
            Some(202),
        ),
        case(
            "a NUL byte in a header value",
            post(&open, "X-Note: a\0b\r\n", ok),
            Some(400),
        ),
        case(
            "a 100 KB header",
            post(&open, &format!("X-Big: {}\r\n", "a".repeat(100 * 1024)), ok),
            Some(431),
        ),
        case(
            "200 headers",
            post(
                &open,
                &(0..200).map(|i| format!("X-H{i}: v\r\n")).collect::<String>(),
                ok,
            ),
            Some(431),
        ),
        case("a 100 KB URL (the request head is over 64 KiB)", post(&format!("/ds/{}", "a".repeat(100 * 1024)), "", ok), Some(431)),
        case("a stream id that is not a UUID", post("/ds/not-a-uuid", "", ok), Some(404)),
        case("the nil UUID", post("/ds/00000000-0000-0000-0000-000000000000", "", ok), Some(404)),
        case("a UUID not in the catalogue", post("/ds/4f1a8d2c-3b6e-4a9f-8c7d-1e2f3a4b5c6d", "", ok), Some(404)),
        case("dot-dot in the path", post(&format!("/ds/../ds/{OPEN}"), "", ok), Some(404)),
        case("encoded slashes", post(&format!("/ds/%2F..%2F{OPEN}"), "", ok), Some(404)),
        case("a trailing slash", post(&format!("/ds/{OPEN}/"), "", ok), Some(404)),
        case("a doubled slash", post(&format!("//ds/{OPEN}"), "", ok), Some(404)),
        case("the admin path on the webhook port", post("/metrics", "", ok), Some(404)),
        case(
            "a wrong method (PUT)",
            format!("PUT {open} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab").into_bytes(),
            Some(405),
        ),
        case(
            "a wrong method (DELETE)",
            format!("DELETE {open} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes(),
            Some(405),
        ),
        case("not HTTP at all", b"HELLO THERE\r\n\r\n".to_vec(), Some(400)),
        case(
            "an idempotency key of 10 KB",
            post(&open, &format!("Idempotency-Key: {}\r\n", "k".repeat(10 * 1024)), ok),
            Some(400),
        ),
        case(
            "a signed stream without a signature",
            post(&format!("/ds/{SIGNED}"), "", signed_body.as_bytes()),
            Some(401),
        ),
        case(
            "a bad signature",
            post(
                &format!("/ds/{SIGNED}"),
                &format!("X-Timestamp: {ts}\r\nX-Signature: sha256={}\r\n", "0".repeat(64)),
                signed_body.as_bytes(),
            ),
            Some(401),
        ),
        case(
            "a good signature over another body",
            post(
                &format!("/ds/{SIGNED}"),
                &format!("X-Timestamp: {ts}\r\nX-Signature: {}\r\n", sign(ts, "orderId=S2")),
                signed_body.as_bytes(),
            ),
            Some(401),
        ),
        case(
            "a replayed signed request, captured an hour ago",
            post(
                &format!("/ds/{SIGNED}"),
                &format!("X-Timestamp: {}\r\nX-Signature: {}\r\n", ts - 3600, sign(ts - 3600, signed_body)),
                signed_body.as_bytes(),
            ),
            Some(401),
        ),
        case(
            "a correctly signed request",
            post(
                &format!("/ds/{SIGNED}"),
                &format!("X-Timestamp: {ts}\r\nX-Signature: {}\r\n", sign(ts, signed_body)),
                signed_body.as_bytes(),
            ),
            Some(202),
        ),
        case(
            "a wrong bearer token",
            post(&format!("/ds/{BEARER}"), "Authorization: Bearer nope\r\n", ok),
            Some(401),
        ),
        case(
            "HTTP/2 preface then garbage",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04garbage-frames".to_vec(),
            None,
        ),
    ];
    cases.push(case(
        "the right bearer token",
        post(
            &format!("/ds/{BEARER}"),
            &format!("Authorization: Bearer {TOKEN}\r\n"),
            ok,
        ),
        Some(202),
    ));
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_clear_answers_and_the_gateway_stays_healthy_and_bounded() {
    let gateway = gateway().await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let pid = gateway.proc.pid();
    let mut failures = Vec::new();
    let mut count = 0;

    for case in one_shot_cases() {
        count += 1;
        let got = raw(&addr, &case.request).await;
        if got != case.expected {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                case.name, case.expected, got
            ));
        }
    }

    // Cases that need time between writes.
    let open = format!("/ds/{OPEN}");
    let slow: Vec<(&str, Option<u16>)> = vec![
        (
            "a body sent byte by byte, slower than the body timeout",
            Some(408),
        ),
        (
            "a lying Content-Length (more announced than sent)",
            Some(408),
        ),
        ("an unterminated chunked body", Some(408)),
    ];
    let mut slow_results = Vec::new();
    {
        // Byte by byte: 30 bytes, one every 150 ms = 4.5 s > the 2 s body timeout.
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let body = b"orderId=N1&status=delivered123";
        s.write_all(
            format!(
                "POST {open} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let writer = async {
            for b in body {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(6), writer)
            .await
            .ok();
        slow_results.push(read_status(&mut s).await);
    }
    {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(
            format!("POST {open} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\norderId=N1")
                .as_bytes(),
        )
        .await
        .unwrap();
        slow_results.push(read_status(&mut s).await);
    }
    {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(format!("POST {open} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").as_bytes())
            .await
            .unwrap();
        slow_results.push(read_status(&mut s).await);
    }
    for ((name, expected), got) in slow.iter().zip(slow_results) {
        count += 1;
        if got != *expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }

    // A Content-Length smaller than the body: the announced bytes are the webhook, the rest
    // is read as a next request on the connection, which is not HTTP.
    {
        count += 1;
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(format!("POST {open} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\norderId=N1GARBAGE-AFTER-THE-BODY\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let first = read_status(&mut s).await;
        if first != Some(202) {
            failures.push(format!("a Content-Length smaller than the body: expected Some(202) for the announced part, got {first:?}"));
        }
    }

    // 100 requests pipelined on one connection: 100 answers.
    {
        count += 1;
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let mut all = Vec::new();
        for i in 0..100 {
            let body = format!("orderId=P{i}");
            all.extend_from_slice(
                format!(
                    "POST {open} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
        s.write_all(&all).await.unwrap();
        let mut text = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut chunk = [0u8; 8192];
        while text.windows(12).filter(|w| w == b"HTTP/1.1 202").count() < 100
            && Instant::now() < deadline
        {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => text.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        let answered = text.windows(12).filter(|w| w == b"HTTP/1.1 202").count();
        if answered != 100 {
            failures.push(format!("100 pipelined requests: {answered} answered 202"));
        }
    }

    // 10,000 connections opened and left idle: all are closed by the gateway within the
    // header timeout, and a normal webhook is served while they are open.
    {
        count += 1;
        let mut idle = Vec::new();
        for _ in 0..10_000 {
            match TcpStream::connect(&addr).await {
                Ok(s) => idle.push(s),
                Err(e) => {
                    failures.push(format!(
                        "10,000 idle connections: connect failed after {}: {e}",
                        idle.len()
                    ));
                    break;
                }
            }
        }
        let during = raw(&addr, &post(&open, "", b"orderId=during-idle")).await;
        if during != Some(202) {
            failures.push(format!(
                "a webhook while 10,000 connections idle: got {during:?}"
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut open_left = idle.len();
        for s in &mut idle {
            let mut b = [0u8; 1];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => open_left -= 1,
                _ => {}
            }
        }
        if open_left != 0 {
            failures.push(format!(
                "idle connections: {open_left} still open 30 s later"
            ));
        }
    }

    // Healthy, serving, bounded.
    let client = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        let status = client
            .get(format!("{}{path}", gateway.admin))
            .send()
            .await
            .unwrap()
            .status();
        if status != 200 {
            failures.push(format!("{path} afterwards: {status}"));
        }
    }
    let after = client
        .post(format!("{}/ds/{OPEN}", gateway.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("orderId=after&status=ok")
        .send()
        .await
        .unwrap()
        .status();
    if after != 202 {
        failures.push(format!("a normal webhook afterwards: {after}"));
    }
    let (rss, peak) = (rss_kb(pid, "VmRSS:"), rss_kb(pid, "VmHWM:"));
    println!("{count} hostile cases; gateway RSS {rss} kB now, peak {peak} kB");
    if peak > 192 * 1024 {
        failures.push(format!("peak RSS {peak} kB is over 192 MiB"));
    }
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// With `HOOKPIPE_HTTP2=true` (hyper_util's version detection in front of the same HTTP/1.1
/// limits) every one-shot case gets the same answer, the HTTP/2 preface with garbage included
/// (then refused by HTTP/2 instead of HTTP/1.1: closed either way).
#[tokio::test]
async fn with_http2_on_every_one_shot_case_gets_the_same_answer() {
    let gateway = gateway_with(&[("HOOKPIPE_HTTP2", "true")]).await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let mut failures = Vec::new();
    let cases = one_shot_cases();
    let count = cases.len();
    for case in cases {
        let got = raw(&addr, &case.request).await;
        if got != case.expected {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                case.name, case.expected, got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed with HTTP/2 on:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
