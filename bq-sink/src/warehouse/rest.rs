//! BigQuery's REST API: datasets and tables (created when missing, schema checked), the suspect
//! lookups (queries), and the `insertAll` write path. Failures are classified into
//! [`WriteError`] here.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::NaiveDate;
use gcp_bigquery_client::Client;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::client_builder::ClientBuilder;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::dataset::Dataset;
use gcp_bigquery_client::model::field_type::FieldType;
use gcp_bigquery_client::model::query_parameter::QueryParameter;
use gcp_bigquery_client::model::query_parameter_type::QueryParameterType;
use gcp_bigquery_client::model::query_parameter_value::QueryParameterValue;
use gcp_bigquery_client::model::query_request::QueryRequest;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::table_data_insert_all_request::TableDataInsertAllRequest;
use gcp_bigquery_client::model::table_field_schema::TableFieldSchema;
use gcp_bigquery_client::model::table_schema::TableSchema;
use gcp_bigquery_client::model::time_partitioning::TimePartitioning;
use hookpipe_common::TableRef;
use uuid::Uuid;

use super::{Warehouse, WriteError, in_date_range, lookup_dates};
use crate::config::BigQueryArgs;
use crate::row::Row;

/// The lookup for suspect rows: only their date partitions (and the days either side) are
/// read. Values are inlined: hit_ids are UUIDs and dates are dates by type, and table names
/// were validated by the catalogue.
pub fn existing_hit_ids_sql(
    table: &TableRef,
    dates: &BTreeSet<NaiveDate>,
    hit_ids: &[Uuid],
) -> String {
    let dates = lookup_dates(dates)
        .iter()
        .map(|d| format!("DATE '{d}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let ids = hit_ids
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT DISTINCT hit_id FROM `{table}` WHERE date IN ({dates}) AND hit_id IN ({ids})")
}

/// The columns of every stream table, exactly as DESIGN.md fixes them.
pub fn schema() -> TableSchema {
    let mut hit_id = TableFieldSchema::string("hit_id");
    hit_id.mode = Some("REQUIRED".into());
    TableSchema::new(vec![
        hit_id,
        TableFieldSchema::string("payload"),
        // INT64 as DESIGN.md writes it (INTEGER is the same type under its legacy name).
        TableFieldSchema::new("received_at", FieldType::Int64),
        TableFieldSchema::date("date"),
    ])
}

/// Checks that an existing table can take our rows: the four columns with compatible types.
/// Extra NULLABLE columns are fine (a user may add some); missing or retyped ones are not.
pub fn check_schema(existing: Option<&TableSchema>) -> Result<(), String> {
    let fields = existing
        .and_then(|s| s.fields.as_ref())
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    // FieldType has no PartialEq; its Debug names are the API's type names.
    let want: [(&str, &[&str]); 4] = [
        ("hit_id", &["String"]),
        ("payload", &["String"]),
        ("received_at", &["Integer", "Int64"]),
        ("date", &["Date"]),
    ];
    for (name, types) in want {
        match fields.iter().find(|f| f.name.eq_ignore_ascii_case(name)) {
            None => return Err(format!("column `{name}` is missing")),
            Some(f) if !types.contains(&format!("{:?}", f.r#type).as_str()) => {
                return Err(format!(
                    "column `{name}` is {:?}, expected {}",
                    f.r#type, types[0]
                ));
            }
            Some(f) if f.mode.as_deref() == Some("REPEATED") => {
                return Err(format!("column `{name}` is REPEATED"));
            }
            Some(_) => {}
        }
    }
    if let Some(f) = fields.iter().find(|f| {
        f.mode.as_deref() == Some("REQUIRED")
            && !want.iter().any(|(n, _)| f.name.eq_ignore_ascii_case(n))
    }) {
        return Err(format!("extra column `{}` is REQUIRED", f.name));
    }
    Ok(())
}

/// Classifies a client error. Anything that is not clearly the data's fault is retried:
/// credentials, permissions, quota and outages get fixed, and the rows must still be written
/// then (or parked meanwhile).
pub fn classify(error: BQError) -> WriteError {
    match error {
        BQError::ResponseError { error } => {
            let e = error.error;
            let reason = e
                .errors
                .first()
                .and_then(|m| m.get("reason"))
                .map(String::as_str)
                .unwrap_or("");
            let text = || format!("HTTP {} {reason}: {}", e.code, e.message);
            match e.code {
                404 => WriteError::TableMissing,
                400 if reason != "backendError" => WriteError::RequestRejected(e.message),
                403 if matches!(reason, "rateLimitExceeded" | "quotaExceeded") => {
                    WriteError::Transient(text())
                }
                401 | 403 => WriteError::Denied(text()),
                500.. => WriteError::ServerError {
                    status: u16::try_from(e.code).unwrap_or(500),
                    detail: text(),
                },
                _ => WriteError::Transient(text()),
            }
        }
        // Not connected: the request never left. Anything else may have reached BigQuery.
        BQError::RequestError(e) if e.is_connect() => WriteError::Transient(e.to_string()),
        BQError::RequestError(e) => WriteError::Ambiguous(e.to_string()),
        other => WriteError::Transient(other.to_string()),
    }
}

/// The REST client: tables, lookups and insertAll.
pub struct Rest {
    client: Client,
    location: Option<String>,
    partition_expiration: Option<Duration>,
}

impl Rest {
    /// The REST client, acting with `auth` (see `credentials.rs`).
    pub async fn connect(
        args: &BigQueryArgs,
        auth: Arc<dyn Authenticator>,
    ) -> Result<Self, BQError> {
        let http = reqwest::Client::builder()
            .timeout(args.timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let mut builder = ClientBuilder::new();
        builder.with_client(http);
        if let Some(endpoint) = &args.endpoint {
            builder.with_v2_base_url(endpoint.trim_end_matches('/').to_owned());
        }
        let client = builder.build_from_authenticator(auth).await?;
        Ok(Self {
            client,
            location: args.location.clone(),
            partition_expiration: args
                .partition_expiration_days
                .map(|d| Duration::from_secs(u64::from(d) * 86_400)),
        })
    }

    async fn create(&self, t: &TableRef) -> Result<(), WriteError> {
        let mut dataset = Dataset::new(&t.project, &t.dataset);
        if let Some(location) = &self.location {
            dataset = dataset.location(location);
        }
        match self.client.dataset().create(dataset).await {
            Ok(_) => tracing::info!(project = %t.project, dataset = %t.dataset, "dataset created"),
            Err(BQError::ResponseError { error }) if error.error.code == 409 => {}
            Err(e) => return Err(classify(e)),
        }
        let mut partitioning = TimePartitioning::per_day().field("date");
        if let Some(expiry) = self.partition_expiration {
            partitioning = partitioning.expiration_ms(expiry);
        }
        let table = Table::new(&t.project, &t.dataset, &t.table, schema())
            .time_partitioning(partitioning)
            .description("Webhook hits, one row per call (hookpipe)");
        match self.client.table().create(table).await {
            Ok(_) => {
                tracing::info!(table = %t, "table created");
                Ok(())
            }
            // Another replica created it first: check what is there.
            Err(BQError::ResponseError { error }) if error.error.code == 409 => self.check(t).await,
            Err(e) => Err(classify(e)),
        }
    }

    async fn check(&self, t: &TableRef) -> Result<(), WriteError> {
        let table = self
            .client
            .table()
            .get(&t.project, &t.dataset, &t.table, None)
            .await
            .map_err(classify)?;
        check_schema(Some(&table.schema))
            .map_err(|e| WriteError::SchemaMismatch(format!("{t}: {e}")))
    }
}

impl Rest {
    /// Creates the dataset and table when missing; checks the schema of an existing one.
    pub async fn ensure_table(&self, table: &TableRef) -> Result<(), WriteError> {
        match self.check(table).await {
            Err(WriteError::TableMissing) => self.create(table).await,
            other => other,
        }
    }

    /// `tabledata.insertAll` with hit_id as insertId. `Ok` means every row is stored.
    pub async fn insert_all(&self, table: &TableRef, rows: &[&Row]) -> Result<(), WriteError> {
        let mut request = TableDataInsertAllRequest::new();
        for row in rows {
            request
                .add_row(Some(row.hit_id.to_string()), row)
                .map_err(|e| WriteError::Transient(e.to_string()))?;
        }
        let response = self
            .client
            .tabledata()
            .insert_all(&table.project, &table.dataset, &table.table, request)
            .await
            .map_err(classify)?;
        let errors = response.insert_errors.unwrap_or_default();
        if errors.is_empty() {
            return Ok(());
        }
        // With skipInvalidRows off, one bad row stops the whole request: rows marked only
        // "stopped" are fine and are retried; the others are the bad ones.
        let rejected: Vec<(usize, String)> = errors
            .iter()
            .filter_map(|e| {
                let index = usize::try_from(e.index?).ok()?;
                let reasons = e.errors.as_deref().unwrap_or(&[]);
                let bad = reasons
                    .iter()
                    .find(|r| r.reason.as_deref() != Some("stopped"))?;
                Some((
                    index,
                    format!(
                        "{}: {}",
                        bad.reason.as_deref().unwrap_or("invalid"),
                        bad.message.as_deref().unwrap_or("")
                    ),
                ))
            })
            .collect();
        if rejected.is_empty() {
            Err(WriteError::Transient(
                "insertAll reported only stopped rows".into(),
            ))
        } else {
            Err(WriteError::RowsRejected(rejected))
        }
    }

    /// Which of `hit_ids` the table holds (see [`existing_hit_ids_sql`]).
    pub async fn existing_hit_ids(
        &self,
        table: &TableRef,
        dates: &BTreeSet<NaiveDate>,
        hit_ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, WriteError> {
        if hit_ids.is_empty() || !dates.iter().any(in_date_range) {
            return Ok(HashSet::new());
        }
        let mut request = QueryRequest::new(existing_hit_ids_sql(table, dates, hit_ids));
        request.use_legacy_sql = false;
        request.timeout_ms = Some(30_000);
        request.location = self.location.clone();
        let response = self
            .client
            .job()
            .query(&table.project, request)
            .await
            .map_err(classify)?;
        if let Some(error) = response.errors.as_ref().and_then(|e| e.first()) {
            return Err(WriteError::Transient(format!(
                "dedup lookup: {}",
                error.message.as_deref().unwrap_or("query failed")
            )));
        }
        if response.job_complete != Some(true) {
            return Err(WriteError::Transient(
                "dedup lookup did not complete in time".into(),
            ));
        }
        Ok(response
            .rows
            .unwrap_or_default()
            .into_iter()
            .filter_map(|row| {
                let cell = row.columns?.into_iter().next()?.value?;
                Uuid::try_parse(cell.as_str()?).ok()
            })
            .collect())
    }
}

/// A query parameter: a named scalar, or an array of scalars of one type.
#[derive(Clone, Debug)]
pub enum Param {
    Scalar(&'static str, String),
    Array(&'static str, Vec<String>),
}

impl Param {
    fn to_bq(&self, name: &str) -> QueryParameter {
        let (parameter_type, parameter_value) = match self {
            Param::Scalar(kind, value) => (
                QueryParameterType {
                    r#type: (*kind).to_owned(),
                    array_type: None,
                    struct_types: None,
                },
                QueryParameterValue {
                    value: Some(value.clone()),
                    array_values: None,
                    struct_values: None,
                },
            ),
            Param::Array(kind, values) => (
                QueryParameterType {
                    r#type: "ARRAY".to_owned(),
                    array_type: Some(Box::new(QueryParameterType {
                        r#type: (*kind).to_owned(),
                        array_type: None,
                        struct_types: None,
                    })),
                    struct_types: None,
                },
                QueryParameterValue {
                    value: None,
                    array_values: Some(
                        values
                            .iter()
                            .map(|v| QueryParameterValue {
                                value: Some(v.clone()),
                                array_values: None,
                                struct_values: None,
                            })
                            .collect(),
                    ),
                    struct_values: None,
                },
            ),
        };
        QueryParameter {
            name: Some(name.to_owned()),
            parameter_type: Some(parameter_type),
            parameter_value: Some(parameter_value),
        }
    }
}

impl Rest {
    /// Runs a parameterised query (named parameters) and returns its rows as text cells. For
    /// queries whose answer fits one response (the audit's batches and counts).
    pub async fn query_rows(
        &self,
        project: &str,
        sql: &str,
        params: &[(&str, Param)],
    ) -> Result<Vec<Vec<Option<String>>>, String> {
        let mut request = QueryRequest::new(sql);
        request.use_legacy_sql = false;
        request.timeout_ms = Some(60_000);
        request.location = self.location.clone();
        request.parameter_mode = Some("NAMED".to_owned());
        request.query_parameters = Some(params.iter().map(|(n, p)| p.to_bq(n)).collect());
        let response = self
            .client
            .job()
            .query(project, request)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(error) = response.errors.as_ref().and_then(|e| e.first()) {
            return Err(error
                .message
                .clone()
                .unwrap_or_else(|| "query failed".into()));
        }
        if response.job_complete != Some(true) {
            return Err("query did not complete in time".into());
        }
        if response.page_token.is_some() {
            return Err("query answer did not fit one response (use smaller batches)".into());
        }
        Ok(response
            .rows
            .unwrap_or_default()
            .into_iter()
            .map(|row| {
                row.columns
                    .unwrap_or_default()
                    .into_iter()
                    .map(|cell| cell.value.and_then(|v| v.as_str().map(str::to_owned)))
                    .collect()
            })
            .collect())
    }
}

/// The legacy write path: `tabledata.insertAll` (`HOOKPIPE_BIGQUERY_WRITE_API=insert-all`),
/// in requests of at most `max_rows` rows and about `max_bytes` bytes (insertAll takes 10 MB).
pub struct InsertAll {
    pub rest: Arc<Rest>,
    pub max_rows: usize,
    pub max_bytes: usize,
}

/// Splits rows into requests of at most `max_rows` rows and about `max_bytes` bytes (a single
/// larger row still goes alone rather than never).
pub fn request_ranges(
    rows: &[&Row],
    max_rows: usize,
    max_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let size = row.approx_bytes();
        if i > start && (i - start >= max_rows || bytes + size > max_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < rows.len() {
        out.push(start..rows.len());
    }
    out
}

/// An error of a request that started at row `start`, as part of a write whose rows before
/// `start` are stored.
pub fn after(start: usize, error: WriteError) -> WriteError {
    let error = match error {
        WriteError::RowsRejected(rows) => {
            WriteError::RowsRejected(rows.into_iter().map(|(i, d)| (i + start, d)).collect())
        }
        other => other,
    };
    if start == 0 {
        error
    } else {
        WriteError::Partial {
            written: (0..start).collect(),
            error: Box::new(error),
        }
    }
}

#[async_trait]
impl Warehouse for InsertAll {
    async fn ensure_table(&self, table: &TableRef) -> Result<(), WriteError> {
        self.rest.ensure_table(table).await
    }

    async fn write(
        &self,
        table: &TableRef,
        _partition: i32,
        rows: &[&Row],
    ) -> Result<(), WriteError> {
        for range in request_ranges(rows, self.max_rows, self.max_bytes) {
            let start = range.start;
            if let Err(error) = self.rest.insert_all(table, &rows[range]).await {
                return Err(after(start, error));
            }
        }
        Ok(())
    }

    async fn existing_hit_ids(
        &self,
        table: &TableRef,
        dates: &BTreeSet<NaiveDate>,
        hit_ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, WriteError> {
        self.rest.existing_hit_ids(table, dates, hit_ids).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspect_lookup_reads_only_their_partitions() {
        let table: TableRef = "p.d.t".parse().unwrap();
        let dates = BTreeSet::from([NaiveDate::from_ymd_opt(2020, 10, 19).unwrap()]);
        let mut dates = dates;
        dates.insert(NaiveDate::from_ymd_opt(11476, 5, 1).unwrap());
        let sql = existing_hit_ids_sql(
            &table,
            &dates,
            &["83cc2a6a-4829-4410-bab4-95b680c5b8d7".parse().unwrap()],
        );
        assert_eq!(
            sql,
            "SELECT DISTINCT hit_id FROM `p.d.t` WHERE date IN (DATE '2020-10-18', DATE '2020-10-19', DATE '2020-10-20') AND hit_id IN ('83cc2a6a-4829-4410-bab4-95b680c5b8d7')"
        );
    }

    fn row(payload_len: usize) -> Row {
        Row {
            hit_id: Uuid::nil(),
            payload: "x".repeat(payload_len).into(),
            received_at: 0,
            date: NaiveDate::from_ymd_opt(2020, 1, 1).unwrap(),
        }
    }

    #[test]
    fn requests_respect_row_and_byte_limits_and_errors_count_from_the_write() {
        let rows: Vec<Row> = (0..7).map(|_| row(100)).collect();
        let refs: Vec<&Row> = rows.iter().collect();
        assert_eq!(request_ranges(&refs, 3, 1_000_000), [0..3, 3..6, 6..7]);
        let size = rows[0].approx_bytes();
        assert_eq!(
            request_ranges(&refs, 100, size * 2),
            [0..2, 2..4, 4..6, 6..7]
        );
        // A single oversized row still goes alone rather than never.
        assert_eq!(
            request_ranges(&refs[..1], 100, 1),
            vec![std::ops::Range { start: 0, end: 1 }]
        );
        assert!(request_ranges(&[], 3, 10).is_empty());
        // The third request (rows 6..) fails: rows 0..6 are stored, the rejected row is 7.
        let e = after(6, WriteError::RowsRejected(vec![(1, "bad".into())]));
        assert_eq!(
            e,
            WriteError::Partial {
                written: (0..6).collect(),
                error: Box::new(WriteError::RowsRejected(vec![(7, "bad".into())])),
            }
        );
        assert_eq!(after(0, WriteError::TableMissing), WriteError::TableMissing);
    }

    #[test]
    fn our_schema_passes_its_own_check() {
        check_schema(Some(&schema())).unwrap();
    }

    #[test]
    fn incompatible_tables_are_named() {
        let mut s = schema();
        s.fields.as_mut().unwrap()[2] = TableFieldSchema::string("received_at");
        assert_eq!(
            check_schema(Some(&s)).unwrap_err(),
            "column `received_at` is String, expected Integer"
        );
        let mut s = schema();
        s.fields.as_mut().unwrap().remove(3);
        assert_eq!(
            check_schema(Some(&s)).unwrap_err(),
            "column `date` is missing"
        );
        let mut s = schema();
        let mut extra = TableFieldSchema::string("tenant");
        extra.mode = Some("REQUIRED".into());
        s.fields.as_mut().unwrap().push(extra);
        assert_eq!(
            check_schema(Some(&s)).unwrap_err(),
            "extra column `tenant` is REQUIRED"
        );
        let mut s = schema();
        s.fields
            .as_mut()
            .unwrap()
            .push(TableFieldSchema::string("note"));
        check_schema(Some(&s)).unwrap();
    }
}
