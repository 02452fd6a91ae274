//! The webhook API's contract (issue #5): schemathesis generates requests from
//! `docs/openapi.yaml` and checks every answer of a real gateway (on the real broker) against
//! it: statuses, content types, JSON bodies, headers such as Retry-After and Allow, and no
//! server errors.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use hookpipe_tests::{Wiring, repo_root, write_catalogue};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_as_its_openapi_document_says() {
    let Ok(schemathesis) = std::env::var("HOOKPIPE_TEST_SCHEMATHESIS") else {
        panic!("HOOKPIPE_TEST_SCHEMATHESIS is not set: run the tests through scripts/test");
    };
    let stream = uuid::Uuid::new_v4().to_string();
    let catalogue = write_catalogue(&[(&stream, "local-project.contract.hits", "Europe/Paris")]);
    let wiring = Wiring::new(catalogue, 1).await;
    let gateway = wiring.gateway(&[]).await;
    let root = repo_root();
    let report = root.join("target").join("schemathesis");
    std::fs::create_dir_all(&report).unwrap();
    let output = tokio::task::spawn_blocking(move || {
        // Run in target/ so its cache directory does not land in the work tree.
        Command::new(schemathesis)
            .current_dir(&report)
            .arg("--config-file")
            .arg(root.join("tests/schemathesis.toml"))
            .arg("run")
            .arg(root.join("docs/openapi.yaml"))
            .args(["--url", &gateway.url, "--checks", "all", "--seed", "1"])
            // The payload is opaque by design: any non-empty UTF-8 body or query string is
            // stored as sent, so "invalid" data generated from the schema is not rejected,
            // and must not be.
            .args(["--exclude-checks", "negative_data_rejection"])
            .args(["--report", "junit", "--report-dir"])
            .arg(&report)
            .env("HOOKPIPE_CONTRACT_STREAM", &stream)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    println!("{text}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "schemathesis found contract violations (above)"
    );
}
