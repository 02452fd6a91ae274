//! The Storage Write API write path (the default): rows appended over gRPC as protobuf, into
//! COMMITTED write streams with explicit offsets, so that the outcome of every append is known
//! rather than guessed.
//!
//! One write stream per (partition, table) this replica owns, created on first use. An append
//! carries the offset it must land at; several appends are in flight per stream, in order, on
//! one connection. When an answer is lost (a connection reset, a timeout) the unanswered
//! appends are sent again *at the same offsets*: BigQuery answers ALREADY_EXISTS for one that
//! had landed and stores one that had not, so nothing is written twice and nothing guessed.
//! When that does not settle it (the stream was finalized, an offset is out of range, resends
//! keep failing), the stream is finalized and its row count says exactly which appends landed;
//! the rest go to a new stream. Only when neither is possible (the stream vanished, BigQuery
//! unreachable) are the unanswered rows reported as of unknown outcome, and the writer looks
//! them up before writing them again.
//!
//! When a partition is revoked or lost, its streams are finalized (`release`): an append still
//! on its way then fails instead of landing after the next owner has looked its rows up.
//!
//! Table creation, schema checks and lookups stay on REST (`rest.rs`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::NaiveDate;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::append_rows_request::{
    ProtoData, Rows,
};
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::append_rows_response::Response as AppendResponse;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::big_query_write_client::BigQueryWriteClient;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::{
    AppendRowsRequest, AppendRowsResponse, CreateWriteStreamRequest, FinalizeWriteStreamRequest,
    ProtoRows, ProtoSchema, WriteStream, write_stream,
};
use hookpipe_common::TableRef;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use uuid::Uuid;

use super::rest::Rest;
use super::{Warehouse, WriteError};
use crate::metrics::Metrics;
use crate::row::Row;

/// Largest append: BigQuery takes requests under 10 MB; the rest is room for the request's
/// other fields and the schema.
pub const MAX_APPEND_BYTES: usize = 9 * 1024 * 1024;
/// Most rows in one append, so a large batch becomes several appends in flight together.
pub const MAX_APPEND_ROWS: usize = 2000;

/// gRPC status codes (google.rpc.Code) the sink tells apart.
mod code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const ALREADY_EXISTS: i32 = 6;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const ABORTED: i32 = 10;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// How the sink reaches the Storage Write API.
#[derive(Clone, Debug)]
pub struct StorageSettings {
    /// `https://bigquerystorage.googleapis.com` (TLS, the default) or the emulator's
    /// `http://127.0.0.1:9060` (plaintext).
    pub endpoint: String,
    /// An extra CA certificate (PEM) to trust for the endpoint, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// How long an append may wait for its answer before it counts as lost.
    pub timeout: Duration,
    /// Appends in flight per write stream.
    pub in_flight: usize,
    /// A stream's connection unused this long is closed (its stream is kept).
    pub idle: Duration,
}

/// The gRPC channel for `settings`: TLS with the system's roots (and an extra CA if given) for
/// `https`, plaintext for `http`. Connects lazily, so the sink starts while BigQuery is down.
pub fn channel(settings: &StorageSettings) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(settings.endpoint.clone())
        .map_err(|e| format!("HOOKPIPE_BIGQUERY_STORAGE_ENDPOINT: {e}"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if settings.endpoint.starts_with("https://") {
        let host = endpoint.uri().host().unwrap_or_default().to_owned();
        let mut tls = ClientTlsConfig::new().domain_name(host).with_native_roots();
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("HOOKPIPE_BIGQUERY_CA_FILE {}: {e}", path.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS for {}: {e}", settings.endpoint))?;
    }
    Ok(endpoint.connect_lazy())
}

/// The writer schema: the descriptor of `hookpipe.bigquery.v1.Row`, from our own `.proto`.
pub fn writer_schema() -> ProtoSchema {
    let set = prost_types::FileDescriptorSet::decode(hookpipe_proto::FILE_DESCRIPTOR_SET)
        .unwrap_or_default();
    let descriptor = set
        .file
        .iter()
        .filter(|f| f.package() == "hookpipe.bigquery.v1")
        .flat_map(|f| f.message_type.iter())
        .find(|m| m.name() == "Row")
        .cloned();
    ProtoSchema {
        proto_descriptor: descriptor,
    }
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Days since 1970-01-01: how the Storage Write API takes a DATE.
pub fn epoch_days(date: NaiveDate) -> i32 {
    const EPOCH: NaiveDate = match NaiveDate::from_ymd_opt(1970, 1, 1) {
        Some(d) => d,
        None => unreachable!(),
    };
    i32::try_from((date - EPOCH).num_days()).unwrap_or(i32::MIN)
}

/// A row as `hookpipe.bigquery.v1.Row` wire bytes, written straight from the record's buffer
/// (no intermediate message, no copy of the payload into a `String`).
pub fn encode_row(row: &Row, buf: &mut Vec<u8>) {
    let mut id = Uuid::encode_buffer();
    let hit_id = row.hit_id.hyphenated().encode_lower(&mut id).as_bytes();
    buf.push(0x0a);
    put_varint(buf, hit_id.len() as u64);
    buf.extend_from_slice(hit_id);
    buf.push(0x12);
    put_varint(buf, row.payload.len() as u64);
    buf.extend_from_slice(&row.payload);
    buf.push(0x18);
    put_varint(buf, row.received_at as u64);
    buf.push(0x20);
    // int32 is encoded sign-extended to 64 bits.
    put_varint(buf, i64::from(epoch_days(row.date)) as u64);
}

/// Splits encoded rows into appends of at most MAX_APPEND_BYTES and MAX_APPEND_ROWS.
pub fn append_ranges(sizes: &[usize]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, size) in sizes.iter().enumerate() {
        let size = size + 8;
        if i > start && (i - start >= MAX_APPEND_ROWS || bytes + size > MAX_APPEND_BYTES) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// The open connection (one AppendRows call) of a write stream.
struct Connection {
    requests: mpsc::Sender<AppendRowsRequest>,
    responses: tonic::Streaming<AppendRowsResponse>,
}

/// One write stream of one (partition, table).
#[derive(Default)]
struct StreamState {
    /// The stream's name; `None` until created (and after it was finalized).
    name: Option<String>,
    /// The offset the next append lands at.
    next: i64,
    connection: Option<Connection>,
    last_used: Option<Instant>,
}

/// A stream's state, locked by the write that uses it.
type SharedState = Arc<tokio::sync::Mutex<StreamState>>;

/// What happened to the appends of one exchange on a connection.
enum Exchange {
    /// All landed (or had landed already).
    Landed,
    /// The first `landed` landed; the next one failed with this answer; later ones were not
    /// stored.
    Failed {
        landed: usize,
        code: i32,
        message: String,
        row_errors: Vec<(usize, String)>,
    },
    /// The first `landed` landed; the answers of the others were lost.
    Lost { landed: usize, reason: String },
}

pub struct Storage {
    rest: Arc<Rest>,
    client: BigQueryWriteClient<Channel>,
    auth: Arc<dyn Authenticator>,
    schema: ProtoSchema,
    streams: Mutex<HashMap<(i32, TableRef), SharedState>>,
    metrics: Arc<Metrics>,
    settings: StorageSettings,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The error for an append's failure `code` (landing status is handled by the caller).
fn classify(code: i32, message: &str) -> WriteError {
    let text = format!("gRPC {code}: {message}");
    match code {
        code::PERMISSION_DENIED | code::UNAUTHENTICATED => WriteError::Denied(text),
        code::RESOURCE_EXHAUSTED => WriteError::Transient(text),
        code::NOT_FOUND => WriteError::TableMissing,
        code::INVALID_ARGUMENT => WriteError::RequestRejected(text),
        code::UNAVAILABLE | code::DEADLINE_EXCEEDED => WriteError::Transient(text),
        // An error answer means the rows were not accepted: retry.
        _ => WriteError::Transient(text),
    }
}

impl Storage {
    pub fn new(
        settings: StorageSettings,
        rest: Arc<Rest>,
        auth: Arc<dyn Authenticator>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let client = BigQueryWriteClient::new(channel(&settings)?)
            .max_decoding_message_size(32 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024);
        let storage = Arc::new(Self {
            rest,
            client,
            auth,
            schema: writer_schema(),
            streams: Mutex::new(HashMap::new()),
            metrics,
            settings,
        });
        Ok(storage)
    }

    /// Closes connections unused for the idle time (their streams are kept). Runs until the
    /// storage is dropped.
    pub async fn close_idle(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let every = (self.settings.idle / 2).max(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let states: Vec<_> = lock(&self.streams).values().cloned().collect();
            let mut open = 0;
            for state in states {
                if let Ok(mut st) = state.try_lock() {
                    let idle = st
                        .last_used
                        .is_none_or(|t| t.elapsed() > self.settings.idle);
                    if idle && st.connection.take().is_some() {
                        tracing::debug!(stream = ?st.name, "idle write stream connection closed");
                    }
                    open += usize::from(st.connection.is_some());
                } else {
                    open += 1;
                }
            }
            self.metrics.storage_connections.set(open as i64);
        }
    }

    /// A request with the caller's credentials and the routing header BigQuery expects.
    async fn request<T>(&self, message: T, routing: &str) -> Result<tonic::Request<T>, WriteError> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.settings.timeout);
        let token = self
            .auth
            .access_token()
            .await
            .map_err(|e| WriteError::Transient(format!("credentials: {e}")))?;
        let metadata = request.metadata_mut();
        if !token.is_empty() {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| WriteError::Transient("credentials: bad token".into()))?;
            metadata.insert("authorization", value);
        }
        if let Ok(value) = routing.parse() {
            metadata.insert("x-goog-request-params", value);
        }
        Ok(request)
    }

    async fn create_stream(&self, table: &TableRef) -> Result<String, WriteError> {
        let parent = format!(
            "projects/{}/datasets/{}/tables/{}",
            table.project, table.dataset, table.table
        );
        let request = self
            .request(
                CreateWriteStreamRequest {
                    parent: parent.clone(),
                    write_stream: Some(WriteStream {
                        r#type: write_stream::Type::Committed as i32,
                        ..Default::default()
                    }),
                },
                &format!("parent={parent}"),
            )
            .await?;
        // The request's own timeout is only a header the server may honour: bound the wait here.
        let stream = tokio::time::timeout(
            self.settings.timeout,
            self.client.clone().create_write_stream(request),
        )
        .await
        .map_err(|_| WriteError::Transient("CreateWriteStream: no answer in time".into()))?
        .map_err(|s| classify(s.code() as i32, s.message()))?
        .into_inner();
        self.metrics.storage_streams_created.inc();
        tracing::debug!(%table, stream = %stream.name, "write stream created");
        Ok(stream.name)
    }

    /// Finalizes a stream: no append lands on it afterwards. Returns its row count, which says
    /// exactly which appends landed.
    async fn finalize(&self, name: &str) -> Result<i64, WriteError> {
        let request = self
            .request(
                FinalizeWriteStreamRequest {
                    name: name.to_owned(),
                },
                &format!("name={name}"),
            )
            .await?;
        let response = tokio::time::timeout(
            self.settings.timeout,
            self.client.clone().finalize_write_stream(request),
        )
        .await
        .map_err(|_| WriteError::Transient("FinalizeWriteStream: no answer in time".into()))?
        .map_err(|s| classify(s.code() as i32, s.message()))?;
        Ok(response.into_inner().row_count)
    }

    fn state(&self, partition: i32, table: &TableRef) -> Arc<tokio::sync::Mutex<StreamState>> {
        lock(&self.streams)
            .entry((partition, table.clone()))
            .or_default()
            .clone()
    }

    /// Sends `appends` (data, rows) in order from offset `st.next`, up to the in-flight window
    /// ahead of the answers, and reads the answers.
    async fn exchange(&self, st: &mut StreamState, appends: &[(Vec<Vec<u8>>, usize)]) -> Exchange {
        let Some(name) = st.name.clone() else {
            return Exchange::Lost {
                landed: 0,
                reason: "no stream".into(),
            };
        };
        let mut offsets = Vec::with_capacity(appends.len());
        let mut offset = st.next;
        for (_, rows) in appends {
            offsets.push(offset);
            offset += *rows as i64;
        }
        let make = |i: usize, with_schema: bool| AppendRowsRequest {
            write_stream: name.clone(),
            offset: Some(offsets[i]),
            rows: Some(Rows::ProtoRows(ProtoData {
                writer_schema: with_schema.then(|| self.schema.clone()),
                rows: Some(ProtoRows {
                    serialized_rows: appends[i].0.clone(),
                }),
            })),
            ..Default::default()
        };
        let mut sent = 0;
        if st.connection.is_none() {
            // The first request goes in before the call: the server may answer the call only
            // once it has read one.
            let (tx, rx) = mpsc::channel(self.settings.in_flight.max(1) + 1);
            if tx.send(make(0, true)).await.is_err() {
                return Exchange::Lost {
                    landed: 0,
                    reason: "connection closed".into(),
                };
            }
            sent = 1;
            let request = match self
                .request(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    &format!("write_stream={name}"),
                )
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    return Exchange::Failed {
                        landed: 0,
                        code: code::UNAVAILABLE,
                        message: e.to_string(),
                        row_errors: Vec::new(),
                    };
                }
            };
            let call = tokio::time::timeout(
                self.settings.timeout,
                self.client.clone().append_rows(request),
            )
            .await;
            match call {
                Ok(Ok(response)) => {
                    st.connection = Some(Connection {
                        requests: tx,
                        responses: response.into_inner(),
                    });
                }
                Ok(Err(status)) if is_transport(&status) => {
                    return Exchange::Lost {
                        landed: 0,
                        reason: status.to_string(),
                    };
                }
                Ok(Err(status)) => {
                    return Exchange::Failed {
                        landed: 0,
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                        row_errors: Vec::new(),
                    };
                }
                Err(_) => {
                    return Exchange::Lost {
                        landed: 0,
                        reason: "no answer to the call in time".into(),
                    };
                }
            }
        }
        let Some(conn) = st.connection.as_mut() else {
            return Exchange::Lost {
                landed: 0,
                reason: "connection closed".into(),
            };
        };
        let mut landed = 0;
        while landed < appends.len() {
            while sent < appends.len() && sent - landed < self.settings.in_flight.max(1) {
                if conn.requests.send(make(sent, false)).await.is_err() {
                    st.connection = None;
                    return Exchange::Lost {
                        landed,
                        reason: "connection closed while sending".into(),
                    };
                }
                sent += 1;
            }
            let answer =
                tokio::time::timeout(self.settings.timeout, conn.responses.message()).await;
            let response = match answer {
                Ok(Ok(Some(response))) => response,
                Ok(Ok(None)) => {
                    st.connection = None;
                    return Exchange::Lost {
                        landed,
                        reason: "the connection ended".into(),
                    };
                }
                Ok(Err(status)) if is_transport(&status) => {
                    st.connection = None;
                    return Exchange::Lost {
                        landed,
                        reason: status.to_string(),
                    };
                }
                Ok(Err(status)) => {
                    st.connection = None;
                    return Exchange::Failed {
                        landed,
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                        row_errors: Vec::new(),
                    };
                }
                Err(_) => {
                    st.connection = None;
                    return Exchange::Lost {
                        landed,
                        reason: format!("no answer within {:?}", self.settings.timeout),
                    };
                }
            };
            match response.response {
                Some(AppendResponse::AppendResult(_)) => {}
                Some(AppendResponse::Error(status)) if status.code == code::ALREADY_EXISTS => {
                    // Sent again after a lost answer: it had landed.
                    self.metrics.already_exists.inc();
                    tracing::info!(stream = %name, offset = offsets[landed], "append had landed before its answer was lost (ALREADY_EXISTS)");
                }
                Some(AppendResponse::Error(status)) => {
                    // Later appends on this connection fail after it (ABORTED, OUT_OF_RANGE):
                    // drop the connection rather than read their answers.
                    st.connection = None;
                    let row_errors = response
                        .row_errors
                        .iter()
                        .map(|e| {
                            (
                                usize::try_from(e.index).unwrap_or(0),
                                format!("row error {}: {}", e.code, e.message),
                            )
                        })
                        .collect();
                    return Exchange::Failed {
                        landed,
                        code: status.code,
                        message: status.message,
                        row_errors,
                    };
                }
                None => {
                    st.connection = None;
                    return Exchange::Lost {
                        landed,
                        reason: "an empty answer".into(),
                    };
                }
            }
            st.next = offsets[landed] + appends[landed].1 as i64;
            landed += 1;
        }
        Exchange::Landed
    }
}

/// Whether a call ended without an answer the sink can act on (the connection broke, the
/// server went away, an internal error): the answers of the appends in flight are lost, and
/// they are sent again at the same offsets, which is always safe. The other codes are the
/// server's answer about the stream or the table.
fn is_transport(status: &tonic::Status) -> bool {
    !matches!(
        status.code(),
        tonic::Code::NotFound
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::OutOfRange
            | tonic::Code::ResourceExhausted
            | tonic::Code::AlreadyExists
    )
}

#[async_trait]
impl Warehouse for Storage {
    async fn ensure_table(&self, table: &TableRef) -> Result<(), WriteError> {
        self.rest.ensure_table(table).await
    }

    async fn write(
        &self,
        table: &TableRef,
        partition: i32,
        rows: &[&Row],
    ) -> Result<(), WriteError> {
        if rows.is_empty() {
            return Ok(());
        }
        let encoded: Vec<Vec<u8>> = rows
            .iter()
            .map(|row| {
                let mut buf = Vec::with_capacity(row.payload.len() + 64);
                encode_row(row, &mut buf);
                buf
            })
            .collect();
        let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();
        let ranges = append_ranges(&sizes);
        let mut appends: Vec<(Vec<Vec<u8>>, usize)> = Vec::with_capacity(ranges.len());
        let mut encoded = encoded.into_iter();
        for range in &ranges {
            let data: Vec<Vec<u8>> = encoded.by_ref().take(range.len()).collect();
            appends.push((data, range.len()));
        }

        let state = self.state(partition, table);
        let mut st = state.lock().await;
        st.last_used = Some(Instant::now());
        // Appends `done..` are still to be written.
        let mut done = 0;
        let mut written: Vec<usize> = Vec::new();
        let mut lost_before = false;
        let mut resends = 0;
        // Streams finalized to settle this write's appends; past two, give up for now.
        let mut settled = 0;
        let error = loop {
            if done == appends.len() {
                return Ok(());
            }
            if st.name.is_none() {
                match self.create_stream(table).await {
                    Ok(name) => {
                        st.name = Some(name);
                        st.next = 0;
                        st.connection = None;
                    }
                    Err(e) => break e,
                }
            }
            match self.exchange(&mut st, &appends[done..]).await {
                Exchange::Landed => {
                    written.extend(ranges[done].start..rows.len());
                    done = appends.len();
                }
                Exchange::Lost { landed, reason } => {
                    if landed > 0 {
                        written.extend(ranges[done].start..ranges[done + landed - 1].end);
                        done += landed;
                    }
                    lost_before = true;
                    resends += 1;
                    tracing::warn!(%table, partition, resends, %reason, "append answers lost; sending them again at the same offsets");
                    if resends <= 3 {
                        tokio::time::sleep(Duration::from_millis(200 * resends)).await;
                        continue;
                    }
                    // Resending did not settle it: finalize, and the row count does.
                    match self.settle(&mut st, &appends[done..]).await {
                        Ok(landed) => {
                            if landed > 0 {
                                written.extend(ranges[done].start..ranges[done + landed - 1].end);
                                done += landed;
                            }
                            resends = 0;
                            // Known exactly now: nothing is in doubt any more.
                            lost_before = false;
                            settled += 1;
                            if settled >= 2 && done < appends.len() {
                                // Known not stored; BigQuery keeps dropping the connection.
                                break WriteError::Transient(format!(
                                    "append answers keep being lost: {reason}"
                                ));
                            }
                            continue;
                        }
                        Err(e) => break e,
                    }
                }
                Exchange::Failed {
                    landed,
                    code,
                    message,
                    row_errors,
                } => {
                    if landed > 0 {
                        written.extend(ranges[done].start..ranges[done + landed - 1].end);
                        done += landed;
                    }
                    let base = ranges[done].start;
                    match code {
                        code::INVALID_ARGUMENT if !row_errors.is_empty() => {
                            break WriteError::RowsRejected(
                                row_errors.into_iter().map(|(i, d)| (base + i, d)).collect(),
                            );
                        }
                        // Finalized by someone else, or our offsets and the stream's disagree:
                        // finalize, and the row count says what landed.
                        code::FAILED_PRECONDITION | code::OUT_OF_RANGE | code::ABORTED => {
                            match self.settle(&mut st, &appends[done..]).await {
                                Ok(landed) => {
                                    if landed > 0 {
                                        written.extend(
                                            ranges[done].start..ranges[done + landed - 1].end,
                                        );
                                        done += landed;
                                    }
                                    lost_before = false;
                                    settled += 1;
                                    if settled >= 2 && done < appends.len() {
                                        break classify(code, &message);
                                    }
                                    continue;
                                }
                                Err(e) => break e,
                            }
                        }
                        code::NOT_FOUND if message.contains("tream") => {
                            // The stream is gone (the emulator restarted; an idle stream was
                            // garbage-collected). With nothing in doubt, a new one will do; an
                            // append whose answer was lost may or may not have landed.
                            st.name = None;
                            st.connection = None;
                            if lost_before {
                                break WriteError::Ambiguous(format!(
                                    "write stream gone after lost answers: {message}"
                                ));
                            }
                            continue;
                        }
                        _ => {
                            if code == code::INVALID_ARGUMENT {
                                // The table may have changed under the stream: a new stream
                                // takes its current schema; the table check decides whether
                                // our rows still fit.
                                st.name = None;
                                st.connection = None;
                                if let Err(e) = self.rest.ensure_table(table).await {
                                    break e;
                                }
                            }
                            let e = classify(code, &message);
                            break if lost_before && !matches!(e, WriteError::RowsRejected(_)) {
                                WriteError::Ambiguous(format!("{e} (after lost answers)"))
                            } else {
                                e
                            };
                        }
                    }
                }
            }
        };
        if written.is_empty() {
            Err(error)
        } else {
            Err(WriteError::Partial {
                written,
                error: Box::new(error),
            })
        }
    }

    async fn existing_hit_ids(
        &self,
        table: &TableRef,
        dates: &BTreeSet<NaiveDate>,
        hit_ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, WriteError> {
        self.rest.existing_hit_ids(table, dates, hit_ids).await
    }

    /// Finalizes every stream of the partition, concurrently and within `RELEASE_WAIT`: an
    /// append of this process still on its way then fails instead of landing after the next
    /// owner looked its rows up. (This runs inside the rebalance: it must not hold it up; a
    /// stream not finalized in time is covered by the next owner's fence wait.)
    async fn release(&self, partition: i32) {
        let states: Vec<((i32, TableRef), SharedState)> = {
            let mut streams = lock(&self.streams);
            let keys: Vec<_> = streams
                .keys()
                .filter(|(p, _)| *p == partition)
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| streams.remove_entry(&k))
                .collect()
        };
        let finalizes = states.into_iter().map(|((_, table), state)| async move {
            let mut st = state.lock().await;
            st.connection = None;
            let Some(name) = st.name.take() else { return };
            match self.finalize(&name).await {
                Ok(rows) => {
                    self.metrics.streams_released.inc();
                    tracing::debug!(%table, partition, stream = %name, rows, "write stream finalized on release");
                }
                Err(error) => {
                    tracing::warn!(%table, partition, %error, "finalizing a released write stream failed; the next owner waits out the fence");
                }
            }
        });
        if tokio::time::timeout(RELEASE_WAIT, futures_util::future::join_all(finalizes))
            .await
            .is_err()
        {
            tracing::warn!(
                partition,
                "finalizing released write streams took too long; the next owner waits out the fence"
            );
        }
    }
}

/// How long a revoke may spend finalizing the partition's write streams.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

impl Storage {
    /// Finalizes the stream and tells from its row count how many of `pending` (sent from
    /// offset `st.next`) landed. The stream is done with; the next append opens a new one.
    async fn settle(
        &self,
        st: &mut StreamState,
        pending: &[(Vec<Vec<u8>>, usize)],
    ) -> Result<usize, WriteError> {
        st.connection = None;
        let Some(name) = st.name.clone() else {
            return Ok(0);
        };
        match self.finalize(&name).await {
            Ok(count) => {
                let mut landed = 0;
                let mut end = st.next;
                for (_, rows) in pending {
                    end += *rows as i64;
                    if end <= count {
                        landed += 1;
                    }
                }
                tracing::info!(stream = %name, row_count = count, landed, "write stream finalized to settle unanswered appends");
                self.metrics.appends_settled.inc();
                st.name = None;
                Ok(landed)
            }
            Err(WriteError::TableMissing) => {
                // The stream is gone with whatever it held: what was in doubt stays so.
                st.name = None;
                Err(WriteError::Ambiguous(format!(
                    "write stream {name} vanished with answers lost"
                )))
            }
            Err(e) => Err(WriteError::Ambiguous(format!(
                "answers lost and the stream could not be finalized: {e}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookpipe_proto::bigquery::Row as ProtoRow;

    fn row(received_at: i64, date: NaiveDate, payload: &str) -> Row {
        Row {
            hit_id: "83cc2a6a-4829-4410-bab4-95b680c5b8d7".parse().unwrap(),
            payload: payload.to_owned().into(),
            received_at,
            date,
        }
    }

    #[test]
    fn rows_encode_exactly_as_the_proto_says() {
        let d = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).unwrap();
        for (at, date, payload) in [
            (
                1_603_131_452_123,
                d(2020, 10, 19),
                "orderId=N1&status=delivered",
            ),
            (-62_135_596_800_000, d(1, 1, 1), ""),
            (0, d(1969, 12, 31), &"x".repeat(300)),
            (i64::MAX, d(9999, 12, 31), "ü€𝄞"),
        ] {
            let r = row(at, date, payload);
            let mut ours = Vec::new();
            encode_row(&r, &mut ours);
            let theirs = ProtoRow {
                hit_id: r.hit_id.to_string(),
                payload: Some(payload.to_owned()),
                received_at: Some(at),
                date: Some(epoch_days(date)),
            }
            .encode_to_vec();
            assert_eq!(ours, theirs, "{date} {at}");
            let back = ProtoRow::decode(ours.as_slice()).unwrap();
            assert_eq!(back.payload.as_deref(), Some(payload));
        }
        assert_eq!(epoch_days(d(1970, 1, 1)), 0);
        assert_eq!(epoch_days(d(2020, 10, 19)), 18_554);
        assert_eq!(epoch_days(d(1969, 12, 31)), -1);
    }

    #[test]
    fn the_writer_schema_is_our_row() {
        let schema = writer_schema();
        let d = schema.proto_descriptor.unwrap();
        assert_eq!(d.name(), "Row");
        let fields: Vec<(&str, i32)> = d.field.iter().map(|f| (f.name(), f.number())).collect();
        assert_eq!(
            fields,
            [
                ("hit_id", 1),
                ("payload", 2),
                ("received_at", 3),
                ("date", 4)
            ]
        );
    }

    #[test]
    fn appends_stay_under_the_request_limit() {
        assert_eq!(append_ranges(&[10; 5]), vec![Range { start: 0, end: 5 }]);
        let sizes = vec![10; MAX_APPEND_ROWS * 2 + 1];
        assert_eq!(
            append_ranges(&sizes),
            [
                0..MAX_APPEND_ROWS,
                MAX_APPEND_ROWS..MAX_APPEND_ROWS * 2,
                MAX_APPEND_ROWS * 2..MAX_APPEND_ROWS * 2 + 1
            ]
        );
        let big = vec![4 * 1024 * 1024; 3];
        assert_eq!(append_ranges(&big), [0..2, 2..3]);
        assert!(append_ranges(&[]).is_empty());
    }
}
