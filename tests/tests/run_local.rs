//! `scripts/run-local` as a user runs it, black-box: Ctrl-C stops it in order (the sink
//! drains, commits and leaves its group before the broker goes), and after starting it again
//! the documented example's row is in the table within 5 seconds — three times over. Runs the
//! script on ports moved by an offset, so a developer's own `scripts/run-local` is not
//! disturbed, with the binaries `scripts/test` built.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hookpipe_tests::{Servers, eventually, group_caught_up, query, repo_root, unique};

/// Moves every port below the ephemeral range (32768–60999 on Linux by default): at +30,000
/// the broker's 39092 could be the local port of some client connection at that moment, and
/// the broker then failed to bind it.
const OFFSET: u16 = 21_000;
const STREAM: &str = "522ed95e-9f07-45f6-a0b7-28bf2d0315e5";

fn port(base: u16) -> u16 {
    base + OFFSET
}

struct RunLocal {
    child: Child,
}

/// Sends `signal` to the process group `pgid`, with bash's builtin `kill`: procps-ng's
/// `/usr/bin/kill -INT -<pgid>` misreads the negative number and signals every process the
/// caller may signal (it took down the test host's shell when it was used here).
fn signal_group(signal: &str, pgid: u32) {
    assert!(pgid > 1, "not a process group: {pgid}");
    let status = Command::new("bash")
        .args(["-c", &format!("kill -s {signal} -- -{pgid}")])
        .status()
        .unwrap();
    assert!(status.success(), "kill -s {signal} -- -{pgid} failed");
}

impl RunLocal {
    fn start(state: &std::path::Path, log: &std::path::Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        // Its own process group, like a terminal's foreground job, so that "Ctrl-C" (SIGINT to
        // the group) reaches the script and whatever it did not put in groups of their own.
        // SIGINT and SIGQUIT back to their defaults first (coreutils `env`): a test run started
        // as a background job of a non-interactive shell inherits them ignored, and a shell
        // cannot trap a signal that was ignored when it started, so Ctrl-C would do nothing.
        let child = Command::new("env")
            .args(["--default-signal=INT,QUIT", "setsid"])
            .arg(repo_root().join("scripts/run-local"))
            .env("HOOKPIPE_LOCAL_PORT_OFFSET", OFFSET.to_string())
            .env("HOOKPIPE_NO_BUILD", "1")
            .env("HOOKPIPE_STATE_DIR", state)
            .env_remove("HOOKPIPE_CATALOGUE")
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child }
    }

    /// Ctrl-C: SIGINT to the script's process group. Returns the exit status.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        signal_group("INT", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "run-local did not stop within 90 s of Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RunLocal {
    /// After a failed assertion too: Ctrl-C, then SIGKILL to the group if the script has not
    /// stopped within 60 s, so a failing test ends instead of waiting for ever.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        signal_group("INT", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        signal_group("KILL", self.child.id());
        let _ = self.child.wait();
    }
}

async fn ready(url: &str) -> Option<()> {
    let r = reqwest::get(url).await.ok()?;
    r.status().is_success().then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_in_order_and_the_next_start_writes_the_example_within_5_s() {
    let state = std::env::temp_dir().join(unique("hookpipe-run-local"));
    std::fs::create_dir_all(&state).unwrap();
    let log = state.join("run-local.log");
    let servers = Servers {
        brokers: format!("127.0.0.1:{}", port(9092)),
        bq_rest: format!("http://127.0.0.1:{}", port(9050)),
        bq_grpc: format!("http://127.0.0.1:{}", port(9060)),
        project: "local-project".into(),
    };
    let client = reqwest::Client::new();
    for start in 1..=3 {
        let mut run = RunLocal::start(&state, &log);
        let sink_ready = format!("http://127.0.0.1:{}/readyz", port(9102));
        let gateway_ready = format!("http://127.0.0.1:{}/readyz", port(9101));
        eventually(
            Duration::from_secs(120),
            "run-local to be ready",
            || async {
                ready(&gateway_ready).await?;
                ready(&sink_ready).await
            },
        )
        .await;
        // The documented example, made unique per start.
        let body = format!("orderId=N{start}&status=delivered&total=120.13&userId=U1");
        let sent = Instant::now();
        let answer: serde_json::Value = client
            .post(format!("http://127.0.0.1:{}/ds/{STREAM}", port(8080)))
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let hit_id = answer["hit_id"].as_str().unwrap().to_owned();
        let sql = format!(
            "SELECT payload FROM `local-project.offline_data.crm_orders` WHERE hit_id = '{hit_id}'"
        );
        eventually(
            Duration::from_secs(5),
            &format!("the example's row within 5 s (start {start})"),
            || async {
                let rows = query(&servers, &sql).await.ok()?;
                (rows.len() == 1 && rows[0][0].as_deref() == Some(body.as_str())).then_some(())
            },
        )
        .await;
        eprintln!(
            "start {start}: row visible {:.2} s after the webhook",
            sent.elapsed().as_secs_f64()
        );
        let status = tokio::task::spawn_blocking(move || {
            let status = run.interrupt();
            drop(run);
            status
        })
        .await
        .unwrap();
        assert!(
            status.success(),
            "run-local exited with {status} after Ctrl-C"
        );
        let text = std::fs::read_to_string(state.join("sink.log")).unwrap_or_default();
        assert!(
            text.matches("bq-sink stopped").count() >= start,
            "the sink did not stop cleanly (start {start})"
        );
        assert!(
            !text.contains("stopped to be restarted"),
            "the sink had to be restarted (start {start})"
        );
        // It committed to the end before the broker stopped: start the broker alone to look.
        // The trap and the wait belong to the shell the test signals (`a && b & wait` would
        // put the whole list, trap included, in a background subshell, and leave the broker
        // running after the test).
        if start == 3 {
            let script = format!(
                "source scripts/lib.sh && start_broker '{}/broker' {} && trap 'stop_started; exit 0' TERM && {{ sleep 60 & wait $!; }}",
                state.display(),
                port(9092)
            );
            let mut broker = Command::new("bash")
                .args(["-c", &script])
                .current_dir(repo_root())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            eventually(
                Duration::from_secs(30),
                "the sink's group committed to the end",
                || {
                    let brokers = servers.brokers.clone();
                    async move {
                        group_caught_up(&brokers, "webhooks", "bq-sink")
                            .await
                            .then_some(())
                    }
                },
            )
            .await;
            let _ = Command::new("bash")
                .args(["-c", &format!("kill -s TERM -- {}", broker.id())])
                .status();
            let _ = broker.wait();
            // And the broker itself, by the pid start_broker wrote: the shell's trap did not
            // always stop it (an orphaned broker on this port outlived the test).
            if let Ok(pid) = std::fs::read_to_string(state.join("broker/broker.pid")) {
                let pid = pid.trim();
                let stopped = Command::new("bash")
                    .args([
                        "-c",
                        &format!(
                            "kill -s TERM {pid} 2>/dev/null || exit 0; for i in $(seq 300); do kill -0 {pid} 2>/dev/null || exit 0; sleep 0.1; done; kill -s KILL {pid}"
                        ),
                    ])
                    .status()
                    .unwrap();
                assert!(stopped.success(), "the broker {pid} did not stop");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&state);
}
