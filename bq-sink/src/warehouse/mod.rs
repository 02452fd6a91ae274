//! BigQuery behind a small trait: make sure a stream's table exists with the right schema,
//! write one partition's rows to it, and look hit_ids up. Every failure is classified here
//! (see [`WriteError`]); what to do about it is decided in `decide.rs`.
//!
//! Two write paths implement the trait: `insert_all` (the legacy streaming API, REST) and
//! `storage` (the Storage Write API over gRPC, the default). Table creation and lookups are
//! REST for both (`rest.rs`).

use std::collections::{BTreeSet, HashSet};

use async_trait::async_trait;
use chrono::NaiveDate;
use hookpipe_common::TableRef;
use uuid::Uuid;

use crate::row::Row;

pub mod credentials;
pub mod rest;
pub mod storage;

/// What went wrong with a BigQuery call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// Refused or failed before it could have had an effect: connection refused, 429, quota,
    /// credentials not available. Retried.
    #[error("transient: {0}")]
    Transient(String),
    /// Sent, but the answer was lost (timeout, connection reset): the rows may or may not be
    /// stored. Retried after looking them up.
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
    /// HTTP 5xx (gRPC: INTERNAL, UNAVAILABLE). Transient on BigQuery (and, for insertAll, of
    /// unknown outcome); the emulator also answers a bad row with HTTP 500 for the whole
    /// request (see `decide.rs`).
    #[error("server error {status}: {detail}")]
    ServerError { status: u16, detail: String },
    /// The destination refuses this table: 403 (permissions revoked, billing off), a dataset
    /// that cannot be created. Retried, then the table's rows are parked.
    #[error("denied: {0}")]
    Denied(String),
    /// The table exists with a schema rows cannot be written to.
    #[error("schema mismatch: {0}")]
    SchemaMismatch(String),
    /// BigQuery refused these rows (by index in the request) for good; the others were not
    /// stored and may be written again.
    #[error("{} rows rejected", .0.len())]
    RowsRejected(Vec<(usize, String)>),
    /// The request as a whole was refused as invalid (HTTP 400): some row in it is bad, but
    /// BigQuery did not say which.
    #[error("request rejected: {0}")]
    RequestRejected(String),
    #[error("table not found")]
    TableMissing,
    /// Some of the rows were stored (by index into the rows written), then `error` happened to
    /// the others (its row indexes, if any, also count from the start of the rows written).
    #[error("{} rows stored, then: {error}", written.len())]
    Partial {
        written: Vec<usize>,
        error: Box<WriteError>,
    },
}

impl WriteError {
    /// Metric label for `bq_sink_write_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            WriteError::Transient(_) => "transient",
            WriteError::Ambiguous(_) => "ambiguous",
            WriteError::ServerError { .. } => "server_error",
            WriteError::Denied(_) => "denied",
            WriteError::SchemaMismatch(_) => "schema_mismatch",
            WriteError::RowsRejected(_) => "rows_rejected",
            WriteError::RequestRejected(_) => "request_rejected",
            WriteError::TableMissing => "table_missing",
            WriteError::Partial { error, .. } => error.kind(),
        }
    }

    /// Whether the failed call may have stored the rows after all.
    pub fn is_ambiguous(&self) -> bool {
        matches!(
            self,
            WriteError::Ambiguous(_) | WriteError::ServerError { .. }
        )
    }
}

/// Values of `bq_sink_write_errors_total{kind}` (the kinds above, and failed lookups).
pub const WRITE_ERROR_KINDS: [&str; 9] = [
    "transient",
    "ambiguous",
    "server_error",
    "denied",
    "schema_mismatch",
    "rows_rejected",
    "request_rejected",
    "table_missing",
    "dedup_lookup",
];

#[async_trait]
pub trait Warehouse: Send + Sync + 'static {
    /// Creates the dataset and table when missing; checks the schema of an existing table.
    async fn ensure_table(&self, table: &TableRef) -> Result<(), WriteError>;

    /// Writes rows read from one partition, in as many requests as the write path needs (in
    /// order, pipelined where it can). `Ok` means all of them are stored; an error says which
    /// were (`Partial`) and why the others were not.
    async fn write(
        &self,
        table: &TableRef,
        partition: i32,
        rows: &[&Row],
    ) -> Result<(), WriteError>;

    /// Which of `hit_ids` the table already holds, for rows received on `dates` (the lookup
    /// also reads the day before and after each, so a zone change cannot hide a row).
    async fn existing_hit_ids(
        &self,
        table: &TableRef,
        dates: &BTreeSet<NaiveDate>,
        hit_ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, WriteError>;

    /// The partition was revoked or lost: nothing more is written for it by this process.
    async fn release(&self, _partition: i32) {}
}

/// Whether BigQuery's DATE type can hold `date` (years 1 to 9999). A row outside cannot be in
/// any table, and a query naming such a date fails.
pub fn in_date_range(date: &NaiveDate) -> bool {
    (1..=9999).contains(&chrono::Datelike::year(date))
}

/// The dates a lookup reads: each row's day and the days either side of it (a row written with
/// another zone, or by an older sink, may sit one day off).
pub fn lookup_dates(dates: &BTreeSet<NaiveDate>) -> BTreeSet<NaiveDate> {
    dates
        .iter()
        .flat_map(|d| [d.pred_opt(), Some(*d), d.succ_opt()])
        .flatten()
        .filter(in_date_range)
        .collect()
}

/// The write path chosen at start-up (`HOOKPIPE_BIGQUERY_WRITE_API`).
pub enum AnyWarehouse {
    Storage(std::sync::Arc<storage::Storage>),
    InsertAll(rest::InsertAll),
}

#[async_trait]
impl Warehouse for AnyWarehouse {
    async fn ensure_table(&self, table: &TableRef) -> Result<(), WriteError> {
        match self {
            Self::Storage(w) => w.ensure_table(table).await,
            Self::InsertAll(w) => w.ensure_table(table).await,
        }
    }

    async fn write(
        &self,
        table: &TableRef,
        partition: i32,
        rows: &[&Row],
    ) -> Result<(), WriteError> {
        match self {
            Self::Storage(w) => w.write(table, partition, rows).await,
            Self::InsertAll(w) => w.write(table, partition, rows).await,
        }
    }

    async fn existing_hit_ids(
        &self,
        table: &TableRef,
        dates: &BTreeSet<NaiveDate>,
        hit_ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, WriteError> {
        match self {
            Self::Storage(w) => w.existing_hit_ids(table, dates, hit_ids).await,
            Self::InsertAll(w) => w.existing_hit_ids(table, dates, hit_ids).await,
        }
    }

    async fn release(&self, partition: i32) {
        match self {
            Self::Storage(w) => w.release(partition).await,
            Self::InsertAll(w) => w.release(partition).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_read_a_day_either_side() {
        let d = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).unwrap();
        let dates = BTreeSet::from([d(2020, 10, 19), d(2020, 10, 20), d(9999, 12, 31)]);
        let read: Vec<String> = lookup_dates(&dates).iter().map(|d| d.to_string()).collect();
        assert_eq!(
            read,
            [
                "2020-10-18",
                "2020-10-19",
                "2020-10-20",
                "2020-10-21",
                "9999-12-30",
                "9999-12-31"
            ]
        );
    }
}
