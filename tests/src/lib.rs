//! Helpers for the integration tests: the servers `scripts/test` started (broker, BigQuery
//! emulator), the pipeline's real binaries started as child processes on free ports, and
//! polling with deadlines instead of sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Seek};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod proxy;
pub mod secured;
pub mod soak;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

/// The servers started by `scripts/test`.
#[derive(Clone, Debug)]
pub struct Servers {
    pub brokers: String,
    /// Emulator REST base, e.g. `http://127.0.0.1:19050`.
    pub bq_rest: String,
    /// Emulator Storage Write API (gRPC), e.g. `http://127.0.0.1:19060`.
    pub bq_grpc: String,
    pub project: String,
}

impl Servers {
    pub fn from_env() -> Self {
        let get = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the integration tests through scripts/test, which starts the broker and the BigQuery emulator")
            })
        };
        Self {
            brokers: get("HOOKPIPE_TEST_BROKERS"),
            bq_rest: get("HOOKPIPE_TEST_BQ_REST"),
            bq_grpc: get("HOOKPIPE_TEST_BQ_GRPC"),
            project: "local-project".into(),
        }
    }

    pub fn bq_endpoint(&self) -> String {
        format!("{}/bigquery/v2", self.bq_rest)
    }
}

/// A name no other test uses: `prefix_<8 hex>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The main topic's `max.message.bytes` for the gateway's default body limit, as
/// scripts/lib.sh sets it (body + 65 KiB: ingest-gateway's `required_message_bytes`).
pub const MAIN_TOPIC_MAX_MESSAGE_BYTES: usize = 1_115_136;
/// The parking topic's: a main-topic record and its reason.
pub const PARKING_TOPIC_MAX_MESSAGE_BYTES: usize = 1_119_232;

pub async fn create_topic(servers: &Servers, name: &str, partitions: i32) {
    create_topic_with(servers, &[], name, partitions, None).await
}

/// A topic whose `max.message.bytes` is set (as a production topic must be for the body limit).
pub async fn create_topic_sized(servers: &Servers, name: &str, partitions: i32, max: usize) {
    create_topic_with(servers, &[], name, partitions, Some(max)).await
}

/// A client configuration: bootstrap servers plus librdkafka properties (security).
pub fn client_config(brokers: &str, props: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in props {
        config.set(k, v);
    }
    config
}

async fn create_topic_with(
    servers: &Servers,
    props: &[(String, String)],
    name: &str,
    partitions: i32,
    max: Option<usize>,
) {
    let admin: AdminClient<DefaultClientContext> =
        client_config(&servers.brokers, props).create().unwrap();
    let max = max.map(|m| m.to_string());
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    if let Some(max) = &max {
        topic = topic.set("max.message.bytes", max);
    }
    let results = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap_or_else(|(topic, e)| panic!("creating topic {topic}: {e}"));
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed when dropped; its output goes to a log file whose tail is
/// printed if the test fails.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

fn binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps and the binaries one level up; a binary
    // of this crate (the soak) lives beside them.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let path = if dir.ends_with("deps") {
        dir.parent().unwrap().join(name)
    } else {
        dir.join(name)
    };
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (scripts/test does)",
        path.display()
    );
    path
}

impl Proc {
    pub fn spawn(name: &str, binary_name: &str, args: &[String], env: &[(String, String)]) -> Self {
        Self::spawn_path(name, &binary(binary_name), args, env)
    }

    /// Another program (found on PATH), such as Prometheus.
    pub fn spawn_program(name: &str, program: &str, args: &[String]) -> Self {
        Self::spawn_path(name, Path::new(program), args, &[])
    }

    fn spawn_path(name: &str, program: &Path, args: &[String], env: &[(String, String)]) -> Self {
        let dir = repo_root().join("target").join("test-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{}.log", unique(name)));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "HOOKPIPE_LOG",
                std::env::var("HOOKPIPE_TEST_LOG").unwrap_or_else(|_| "info,rdkafka=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Self {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    /// What the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id (for reading its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process stopped").id()
    }

    /// Sends SIGKILL: the process gets no chance to flush or commit.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        send_signal(signal, self.child.as_ref().expect("process stopped").id());
    }

    /// Waits for the process to exit by itself; its status, or `None` after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("process already stopped");
        send_signal("TERM", child.id());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of {} ({}) ----",
                self.name,
                self.log.display()
            );
            if let Ok(mut f) = std::fs::File::open(&self.log) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(4000)));
                for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Sends `signal` to one process, with bash's builtin `kill` (procps-ng's `/usr/bin/kill`
/// misreads some argument forms; see tests/tests/run_local.rs).
pub fn send_signal(signal: &str, pid: u32) {
    assert!(pid > 1, "not a process: {pid}");
    let _ = Command::new("bash")
        .args(["-c", &format!("kill -s {signal} -- {pid}")])
        .status();
}

/// A running gateway.
pub struct Gateway {
    pub proc: Proc,
    pub url: String,
    pub admin: String,
}

/// A running sink.
pub struct Sink {
    pub proc: Proc,
    pub admin: String,
}

/// What a test's pipeline uses: its own topic, dead-letter topic and consumer group.
#[derive(Clone, Debug)]
pub struct Wiring {
    pub servers: Servers,
    pub catalogue: PathBuf,
    pub topic: String,
    pub dlq_topic: String,
    pub parking_topic: String,
    pub group: String,
    /// Kafka security for a secured broker: librdkafka properties for the harness's own
    /// clients, and the same as HOOKPIPE_* settings for the services and commands.
    pub kafka_props: Vec<(String, String)>,
    pub kafka_env: Vec<(String, String)>,
}

impl Wiring {
    /// Fresh topics (main with `partitions`, dead-letter with 1) and group for one test.
    pub async fn new(catalogue: PathBuf, partitions: i32) -> Self {
        Self::on(Servers::from_env(), catalogue, partitions).await
    }

    /// The same on other servers (a test's private broker).
    pub async fn on(servers: Servers, catalogue: PathBuf, partitions: i32) -> Self {
        Self::secured(servers, catalogue, partitions, vec![], vec![]).await
    }

    /// On a secured broker: `kafka_props` for the harness's clients (librdkafka names),
    /// `kafka_env` for the services (HOOKPIPE_KAFKA_* names).
    pub async fn secured(
        servers: Servers,
        catalogue: PathBuf,
        partitions: i32,
        kafka_props: Vec<(String, String)>,
        kafka_env: Vec<(String, String)>,
    ) -> Self {
        let topic = unique("webhooks");
        let dlq_topic = format!("{topic}-dlq");
        let parking_topic = format!("{topic}-parked");
        for (name, n, max) in [
            (&topic, partitions, Some(MAIN_TOPIC_MAX_MESSAGE_BYTES)),
            (&dlq_topic, 1, None),
            (&parking_topic, 1, Some(PARKING_TOPIC_MAX_MESSAGE_BYTES)),
        ] {
            create_topic_with(&servers, &kafka_props, name, n, max).await;
        }
        Self {
            servers,
            catalogue,
            topic,
            dlq_topic,
            parking_topic,
            group: unique("bq-sink"),
            kafka_props,
            kafka_env,
        }
    }

    /// A client configuration for the harness (bootstrap servers and security).
    pub fn client_config(&self) -> ClientConfig {
        client_config(&self.servers.brokers, &self.kafka_props)
    }

    fn common_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "HOOKPIPE_CATALOGUE".into(),
                self.catalogue.display().to_string(),
            ),
            (
                "HOOKPIPE_KAFKA_BROKERS".into(),
                self.servers.brokers.clone(),
            ),
            ("HOOKPIPE_TOPIC".into(), self.topic.clone()),
            ("HOOKPIPE_CATALOGUE_RELOAD_INTERVAL".into(), "200ms".into()),
        ]
        .into_iter()
        .chain(self.kafka_env.iter().cloned())
        .collect()
    }

    pub async fn gateway(&self, extra: &[(&str, &str)]) -> Gateway {
        self.gateway_at(free_port(), free_port(), extra).await
    }

    /// A gateway, without waiting for it to be ready (for one that must not become ready).
    pub fn spawn_gateway(&self, extra: &[(&str, &str)]) -> Gateway {
        self.spawn_gateway_at(free_port(), free_port(), extra)
    }

    fn spawn_gateway_at(&self, port: u16, admin_port: u16, extra: &[(&str, &str)]) -> Gateway {
        let mut env = self.common_env();
        env.push(("HOOKPIPE_LISTEN".into(), format!("127.0.0.1:{port}")));
        // Only for tansu (see HOOKPIPE_PRODUCER_MESSAGE_TIMEOUT); a test may override it.
        env.push(("HOOKPIPE_PRODUCER_MESSAGE_TIMEOUT".into(), "0".into()));
        env.push((
            "HOOKPIPE_ADMIN_LISTEN".into(),
            format!("127.0.0.1:{admin_port}"),
        ));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Gateway {
            proc: Proc::spawn("gateway", "ingest-gateway", &[], &env),
            url: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
        }
    }

    /// A gateway on given ports (to start one again where its senders expect it).
    pub async fn gateway_at(&self, port: u16, admin_port: u16, extra: &[(&str, &str)]) -> Gateway {
        let gateway = self.spawn_gateway_at(port, admin_port, extra);
        wait_ready(&gateway.admin, "gateway").await;
        gateway
    }

    pub async fn sink(&self, extra: &[(&str, &str)]) -> Sink {
        let sink = self.spawn_sink(extra);
        wait_ready(&sink.admin, "sink").await;
        sink
    }

    /// A sink, not waiting for it to be ready.
    pub fn spawn_sink(&self, extra: &[(&str, &str)]) -> Sink {
        let admin_port = free_port();
        let mut env = self.sink_env();
        env.push((
            "HOOKPIPE_ADMIN_LISTEN".into(),
            format!("127.0.0.1:{admin_port}"),
        ));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Sink {
            proc: Proc::spawn("sink", "bq-sink", &[], &env),
            admin: format!("http://127.0.0.1:{admin_port}"),
        }
    }

    /// Runs a `bq-sink` command (audit, replay-dlq) with the sink's settings; its exit code,
    /// stdout and stderr.
    pub async fn sink_command(&self, args: &[&str]) -> (i32, String, String) {
        let env = self.sink_env();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(binary("bq-sink"))
                .args(&args)
                .envs(env)
                .env("HOOKPIPE_LOG", "warn")
                .stdin(Stdio::null())
                .output()
        })
        .await
        .unwrap()
        .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// The sink's settings for this wiring (without its admin address).
    pub fn sink_env(&self) -> Vec<(String, String)> {
        let mut env = self.common_env();
        env.push(("HOOKPIPE_GROUP_ID".into(), self.group.clone()));
        env.push(("HOOKPIPE_DLQ_TOPIC".into(), self.dlq_topic.clone()));
        env.push(("HOOKPIPE_PARKING_TOPIC".into(), self.parking_topic.clone()));
        env.push(("HOOKPIPE_BIGQUERY_AUTH".into(), "none".into()));
        // The emulator answers a bad row with HTTP 500 for the whole request.
        env.push(("HOOKPIPE_BIGQUERY_BAD_ROWS_AS_5XX".into(), "true".into()));
        env.push((
            "HOOKPIPE_BIGQUERY_ENDPOINT".into(),
            self.servers.bq_endpoint(),
        ));
        env.push((
            "HOOKPIPE_BIGQUERY_STORAGE_ENDPOINT".into(),
            self.servers.bq_grpc.clone(),
        ));
        // The write path under test: the Storage Write API unless HOOKPIPE_TEST_WRITE_API says
        // otherwise (scripts/test runs the sink tests with both).
        env.push((
            "HOOKPIPE_BIGQUERY_WRITE_API".into(),
            std::env::var("HOOKPIPE_TEST_WRITE_API").unwrap_or_else(|_| "storage".into()),
        ));
        env
    }
}

pub async fn wait_ready(admin: &str, what: &str) {
    let url = format!("{admin}/readyz");
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(30), &format!("{what} /readyz"), || {
        let request = client.get(&url).send();
        async move {
            request
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await;
}

/// A value from a query result: `None` for NULL.
pub type Cell = Option<String>;

/// Runs SQL on the emulator and returns rows of cells. Errors (table not found yet, ...) are
/// returned as `Err` so callers can poll.
pub async fn query(servers: &Servers, sql: &str) -> Result<Vec<Vec<Cell>>, String> {
    let client = reqwest::Client::new();
    let base = format!(
        "{}/bigquery/v2/projects/{}/queries",
        servers.bq_rest, servers.project
    );
    let mut response: serde_json::Value = client
        .post(&base)
        .json(&serde_json::json!({ "query": sql, "useLegacySql": false }))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    loop {
        if let Some(errors) = response
            .get("errors")
            .and_then(|e| e.as_array())
            .filter(|e| !e.is_empty())
        {
            return Err(format!("{errors:?}"));
        }
        for row in response["rows"].as_array().into_iter().flatten() {
            out.push(
                row["f"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["v"].as_str().map(str::to_owned))
                    .collect(),
            );
        }
        // Large results come in pages (10,000 rows on the emulator): follow them.
        let (Some(token), Some(job)) = (
            response["pageToken"].as_str(),
            response["jobReference"]["jobId"].as_str(),
        ) else {
            return Ok(out);
        };
        response = client
            .get(format!("{base}/{job}"))
            .query(&[("pageToken", token)])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
    }
}

/// Reads a metric's value (sum over all label sets matching `labels`) from a `/metrics` page.
pub async fn metric(admin: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric_name, label_part) = key.split_once('{').unwrap_or((key, ""));
            (metric_name == name
                && labels
                    .iter()
                    .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// Reads `count` records from the start of `topic` with a fresh consumer group, decoding each
/// value as an envelope; panics if fewer arrive within `timeout`.
pub async fn consume_envelopes(
    brokers: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<(Vec<u8>, hookpipe_proto::Envelope)> {
    read_topic(
        brokers,
        topic,
        timeout,
        &format!("{count} records"),
        |records| records.len() >= count,
    )
    .await
}

/// Reads `topic` from the start until every hit in `hit_ids` has been seen; returns all records
/// read. The topic may hold more (a 503 answer does not prove a message never arrived).
pub async fn consume_until_seen(
    brokers: &str,
    topic: &str,
    hit_ids: &std::collections::HashSet<String>,
    timeout: Duration,
) -> Vec<(Vec<u8>, hookpipe_proto::Envelope)> {
    let mut seen = std::collections::HashSet::new();
    read_topic(
        brokers,
        topic,
        timeout,
        &format!("{} given hits", hit_ids.len()),
        |records| {
            if let Some((_, e)) = records.last()
                && hit_ids.contains(&e.hit_id)
            {
                seen.insert(e.hit_id.clone());
            }
            seen.len() == hit_ids.len()
        },
    )
    .await
}

async fn read_topic(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&[(Vec<u8>, hookpipe_proto::Envelope)]) -> bool,
) -> Vec<(Vec<u8>, hookpipe_proto::Envelope)> {
    use hookpipe_proto::Message as _;
    use rdkafka::Message as _;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    if done(&out) {
        return out;
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{what} did not arrive on {topic} within {timeout:?} ({} records read)",
            out.len()
        );
        if let Ok(Ok(message)) = tokio::time::timeout(left, consumer.recv()).await {
            let envelope = hookpipe_proto::Envelope::decode(message.payload().unwrap_or(&[]))
                .expect("an envelope");
            out.push((message.key().unwrap_or(&[]).to_vec(), envelope));
            if done(&out) {
                return out;
            }
        }
    }
}

/// A server a test owns and may stop and start again with the same data directory. Each run
/// logs to its own file; the directory is removed unless the test failed.
struct Restartable {
    name: &'static str,
    dir: PathBuf,
    runs: u32,
    proc: Option<Proc>,
}

impl Restartable {
    fn new(name: &'static str) -> Self {
        let dir = std::env::temp_dir().join(unique(&format!("hookpipe-{name}")));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            name,
            dir,
            runs: 0,
            proc: None,
        }
    }

    /// Starts `program` with `args` in the data directory.
    fn run(&mut self, program: &str, args: &[String]) {
        self.runs += 1;
        let log = self.dir.join(format!("{}.{}.log", self.name, self.runs));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .current_dir(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        self.proc = Some(Proc {
            name: format!("private {}, run {}", self.name, self.runs),
            child: Some(child),
            log,
        });
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        // Dropping the Proc kills it and prints its log tail when the test failed.
        self.proc.take();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

async fn wait_listening(port: u16, what: &str) {
    let addr = format!("127.0.0.1:{port}");
    eventually(Duration::from_secs(20), what, || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }
    })
    .await;
}

/// A tansu broker of the test's own, which the test may stop and start again (same port,
/// same storage) without disturbing other tests.
pub struct PrivateBroker {
    pub port: u16,
    server: Restartable,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let mut broker = Self {
            port: free_port(),
            server: Restartable::new("broker"),
        };
        broker.resume().await;
        broker
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL, like a crashed node).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.server.proc.take() {
            p.kill9();
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open and nothing answers, as in a long
    /// GC pause, a network partition or a failover.
    pub fn pause(&self) {
        if let Some(p) = &self.server.proc {
            p.signal("STOP");
        }
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn unpause(&self) {
        if let Some(p) = &self.server.proc {
            p.signal("CONT");
        }
    }

    /// Starts it again on the same port with the same storage.
    pub async fn resume(&mut self) {
        let tansu = std::env::var("HOOKPIPE_TEST_TANSU")
            .expect("HOOKPIPE_TEST_TANSU: run through scripts/test");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let args = [
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "sqlite://tansu.db",
        ];
        self.server.run(&tansu, &args.map(String::from));
        wait_listening(self.port, "the private broker to listen").await;
    }
}

/// Publishes raw records (key, value) to a topic and waits for each acknowledgement.
pub async fn produce(brokers: &str, topic: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for (key, value) in records {
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// Reads every record of a topic from the start, up to `count`, as raw (key, value).
pub async fn read_raw(
    brokers: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    read_raw_with(client_config(brokers, &[]), topic, count, timeout).await
}

/// The same with a client configuration of the caller's (a secured broker).
pub async fn read_raw_with(
    base: ClientConfig,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = base
        .clone()
        .set("group.id", unique("raw-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {count} records on {topic} within {timeout:?}",
            out.len()
        );
        if let Ok(Ok(m)) = tokio::time::timeout(left, consumer.recv()).await {
            out.push((
                m.key().unwrap_or(&[]).to_vec(),
                m.payload().unwrap_or(&[]).to_vec(),
            ));
        }
    }
    out
}

/// A catalogue file of the test's own, in a fresh directory, with one stream per
/// `(id, timezone)` writing to `local-project.<dataset>.<table>`; returns its path.
pub fn write_catalogue(streams: &[(&str, &str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(unique("hookpipe-catalogue"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("streams.yaml");
    replace_catalogue(&path, streams);
    path
}

/// Replaces a catalogue atomically (as a ConfigMap update does). Each stream is
/// `(id, "local-project.dataset.table", timezone)`.
pub fn replace_catalogue(path: &Path, streams: &[(&str, &str, &str)]) {
    let mut text = String::from("streams:\n");
    for (id, table, zone) in streams {
        text.push_str(&format!(
            "  - id: {id}\n    table: {table}\n    timezone: \"{zone}\"\n"
        ));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `(COUNT(*), COUNT(DISTINCT hit_id))` of a table, or `None` while it does not exist.
pub async fn counts(servers: &Servers, table: &str) -> Option<(u64, u64)> {
    let rows = query(
        servers,
        &format!("SELECT COUNT(*), COUNT(DISTINCT hit_id) FROM `{table}`"),
    )
    .await
    .ok()?;
    let row = rows.first()?;
    Some((
        row[0].as_deref()?.parse().ok()?,
        row[1].as_deref()?.parse().ok()?,
    ))
}

/// All hit_ids of a table.
pub async fn hit_ids(servers: &Servers, table: &str) -> Vec<String> {
    query(servers, &format!("SELECT hit_id FROM `{table}`"))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect()
}

/// A BigQuery emulator of the test's own, which it may stop and start again with its data.
pub struct PrivateEmulator {
    pub rest_port: u16,
    grpc_port: u16,
    server: Restartable,
}

impl PrivateEmulator {
    pub async fn start() -> Self {
        let mut emulator = Self {
            rest_port: free_port(),
            grpc_port: free_port(),
            server: Restartable::new("emulator"),
        };
        std::fs::create_dir_all(emulator.server.dir.join("data")).unwrap();
        emulator.resume().await;
        emulator
    }

    pub fn rest(&self) -> String {
        format!("http://127.0.0.1:{}", self.rest_port)
    }

    pub fn grpc(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Stops the emulator (SIGTERM, then waits).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.server.proc.take() {
            let _ = p.terminate(Duration::from_secs(20));
        }
    }

    /// Starts it again on the same ports with the same data.
    pub async fn resume(&mut self) {
        let bin = std::env::var("HOOKPIPE_TEST_BQEMU")
            .expect("HOOKPIPE_TEST_BQEMU: run through scripts/test");
        let (rest, grpc) = (self.rest_port.to_string(), self.grpc_port.to_string());
        let args = [
            "start",
            "--rest-host",
            "127.0.0.1",
            "--rest-port",
            &rest,
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            &grpc,
            "--project",
            "local-project",
            "--persistent",
            "--data-dir",
            "data",
            "--log-level",
            "warning",
        ];
        self.server.run(&bin, &args.map(String::from));
        let url = format!("{}/readyz", self.rest());
        eventually(
            Duration::from_secs(60),
            "the private emulator to be ready",
            || {
                let url = url.clone();
                async move {
                    reqwest::get(url)
                        .await
                        .ok()
                        .filter(|r| r.status().is_success())
                        .map(|_| ())
                }
            },
        )
        .await;
    }
}

/// Sends `count` webhooks to a stream through the gateway, `concurrency` at a time, each with
/// its own Idempotency-Key, retrying on connection errors and 503 as real senders do. Returns
/// the acknowledged hit_ids.
pub async fn send_hits(
    gateway_url: &str,
    stream: &str,
    count: usize,
    concurrency: usize,
    pace: Duration,
) -> std::collections::HashSet<String> {
    let client = reqwest::Client::new();
    let url = std::sync::Arc::new(format!("{gateway_url}/ds/{stream}"));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        workers.spawn(async move {
            let mut acked = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return acked;
                }
                let key = format!("{}-{i}", uuid::Uuid::new_v4().simple());
                for _attempt in 0..200 {
                    let sent = client
                        .post(url.as_str())
                        .header("content-type", "application/x-www-form-urlencoded")
                        .header("idempotency-key", &key)
                        .body(format!("orderId=N{i}&status=delivered"))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == 202 => {
                            let json: serde_json::Value = r.json().await.unwrap();
                            acked.push(json["hit_id"].as_str().unwrap().to_owned());
                            break;
                        }
                        Ok(r) if r.status() == 503 => {}
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        Err(_) => {}
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(pace).await;
            }
        });
    }
    let mut all = std::collections::HashSet::new();
    while let Some(r) = workers.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

/// Whether `group` has committed every partition of `topic` up to its end (a partition with no
/// records counts as done).
pub async fn group_caught_up(brokers: &str, topic: &str, group: &str) -> bool {
    group_caught_up_with(client_config(brokers, &[]), topic, group).await
}

/// The same with a client configuration of the caller's (a secured broker).
pub async fn group_caught_up_with(base: ClientConfig, topic: &str, group: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let (topic, group) = (topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = base.clone().set("group.id", &group).create().ok()?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .ok()?;
        let mut list = TopicPartitionList::new();
        for p in metadata.topics().first()?.partitions() {
            list.add_partition(&topic, p.id());
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(5))
            .ok()?;
        for element in committed.elements() {
            let (low, high) = consumer
                .fetch_watermarks(&topic, element.partition(), Duration::from_secs(5))
                .ok()?;
            let at = match element.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            if at < high {
                return Some(false);
            }
        }
        Some(true)
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

impl Wiring {
    /// Whether the pipeline is quiescent: the sink's group committed to the end of every main
    /// partition, and its parking drainer to the end of the parking topic. Only then are row
    /// counts final (no record is still on its way to a table).
    pub async fn quiescent(&self) -> bool {
        group_caught_up_with(self.client_config(), &self.topic, &self.group).await
            && group_caught_up_with(
                self.client_config(),
                &self.parking_topic,
                &format!("{}.parking", self.group),
            )
            .await
    }

    /// Waits until the pipeline is quiescent, then checks that `table` holds every hit of
    /// `acked` exactly once and nothing else.
    pub async fn assert_exactly_once(
        &self,
        table: &str,
        acked: &std::collections::HashSet<String>,
        timeout: Duration,
    ) {
        let expected = acked.len() as u64;
        eventually(
            timeout,
            &format!("the sink to commit every record ({expected} hits for {table})"),
            || async {
                if !self.quiescent().await {
                    return None;
                }
                // Committed means written: the rows must be there now.
                counts(&self.servers, table)
                    .await
                    .filter(|(rows, _)| *rows >= expected)
                    .map(|_| ())
            },
        )
        .await;
        let (rows, distinct) = counts(&self.servers, table).await.unwrap();
        assert_eq!(
            rows, distinct,
            "{table}: {rows} rows but {distinct} distinct hit_ids"
        );
        assert_eq!(rows, expected, "{table}: rows vs acknowledged hits");
        let stored: std::collections::HashSet<String> =
            hit_ids(&self.servers, table).await.into_iter().collect();
        let missing = acked.difference(&stored).count();
        assert_eq!(
            missing, 0,
            "{missing} acknowledged hits are missing from {table}"
        );
    }
}
