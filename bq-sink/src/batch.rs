//! Micro-batches per destination table, flushed by rows, bytes or age. Pure: the pipeline
//! decides what to do with a batch that is due.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hookpipe_common::TableRef;

use crate::row::Row;

/// A row and the record it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub row: Row,
    /// The stream, for per-stream metrics.
    pub stream: uuid::Uuid,
    pub partition: i32,
    pub offset: i64,
    /// The original record value, kept so a row BigQuery rejects can be dead-lettered (or a
    /// row parked) whole. The row's payload is a slice of it: one buffer per record.
    pub original: bytes::Bytes,
    /// May already be in the table (in the range after an assignment that a previous owner
    /// may have written, put back by replay or from parking, or sent in a request whose answer
    /// was lost): looked up before it is written.
    pub suspect: bool,
    /// Put back by `replay-dlq` or from the parking topic. Such rows are tried even while
    /// their table is parked: they are how a recovered table is noticed.
    pub replayed: bool,
}

#[derive(Debug, Default)]
pub struct TableBatch {
    pub items: Vec<Item>,
    pub bytes: usize,
    pub started: Option<Instant>,
}

/// Why a batch was flushed (the `trigger` label of `bq_sink_flushes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Rows,
    Bytes,
    Age,
    Shutdown,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Rows => "rows",
            Trigger::Bytes => "bytes",
            Trigger::Age => "age",
            Trigger::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

#[derive(Debug, Default)]
pub struct Batches {
    tables: HashMap<TableRef, TableBatch>,
    rows: usize,
}

impl Batches {
    /// Adds a row; returns the table and trigger if its batch is now full.
    pub fn push(
        &mut self,
        table: &TableRef,
        item: Item,
        limits: &Limits,
        now: Instant,
    ) -> Option<Trigger> {
        let size = item.row.approx_bytes();
        let batch = match self.tables.get_mut(table) {
            Some(batch) => batch,
            None => self.tables.entry(table.clone()).or_default(),
        };
        batch.started.get_or_insert(now);
        batch.items.push(item);
        batch.bytes += size;
        self.rows += 1;
        if batch.items.len() >= limits.max_rows {
            Some(Trigger::Rows)
        } else if batch.bytes >= limits.max_bytes {
            Some(Trigger::Bytes)
        } else {
            None
        }
    }

    /// Removes and returns a table's batch.
    pub fn take(&mut self, table: &TableRef) -> Option<TableBatch> {
        let batch = self.tables.remove(table)?;
        self.rows -= batch.items.len();
        Some(batch)
    }

    /// Whether a table's batch is full or old enough to flush.
    pub fn is_due(&self, table: &TableRef, limits: &Limits, now: Instant) -> Option<Trigger> {
        let batch = self.tables.get(table)?;
        if batch.items.len() >= limits.max_rows {
            Some(Trigger::Rows)
        } else if batch.bytes >= limits.max_bytes {
            Some(Trigger::Bytes)
        } else if batch
            .started
            .is_some_and(|s| now.duration_since(s) >= limits.max_age)
        {
            Some(Trigger::Age)
        } else {
            None
        }
    }

    /// Tables whose oldest row is older than the age limit.
    pub fn due(&self, limits: &Limits, now: Instant) -> Vec<TableRef> {
        self.tables
            .iter()
            .filter(|(_, b)| {
                b.started
                    .is_some_and(|s| now.duration_since(s) >= limits.max_age)
            })
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// When the next batch of a table not in `busy` becomes due by age.
    pub fn next_deadline(
        &self,
        limits: &Limits,
        busy: &std::collections::HashSet<TableRef>,
    ) -> Option<Instant> {
        self.tables
            .iter()
            .filter(|(t, _)| !busy.contains(*t))
            .filter_map(|(_, b)| b.started)
            .min()
            .map(|s| s + limits.max_age)
    }

    pub fn tables(&self) -> Vec<TableRef> {
        self.tables.keys().cloned().collect()
    }

    /// Rows buffered across tables.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(offset: i64, payload_len: usize) -> Item {
        Item {
            row: Row {
                hit_id: uuid::Uuid::from_u128(offset as u128),
                payload: "x".repeat(payload_len).into(),
                received_at: 0,
                date: chrono::NaiveDate::from_ymd_opt(2020, 1, 1).unwrap(),
            },
            stream: uuid::Uuid::nil(),
            partition: 0,
            offset,
            original: bytes::Bytes::new(),
            suspect: false,
            replayed: false,
        }
    }

    fn table(name: &str) -> TableRef {
        format!("p.d.{name}").parse().unwrap()
    }

    const LIMITS: Limits = Limits {
        max_rows: 3,
        max_bytes: 10_000,
        max_age: Duration::from_secs(1),
    };

    #[test]
    fn flushes_by_rows_per_table() {
        let mut b = Batches::default();
        let now = Instant::now();
        assert_eq!(b.push(&table("a"), item(0, 1), &LIMITS, now), None);
        assert_eq!(b.push(&table("b"), item(1, 1), &LIMITS, now), None);
        assert_eq!(b.push(&table("a"), item(2, 1), &LIMITS, now), None);
        assert_eq!(
            b.push(&table("a"), item(3, 1), &LIMITS, now),
            Some(Trigger::Rows)
        );
        assert_eq!(b.rows(), 4);
        assert_eq!(b.take(&table("a")).unwrap().items.len(), 3);
        assert_eq!(b.rows(), 1);
    }

    #[test]
    fn flushes_by_bytes() {
        let mut b = Batches::default();
        assert_eq!(
            b.push(&table("a"), item(0, 20_000), &LIMITS, Instant::now()),
            Some(Trigger::Bytes)
        );
    }

    #[test]
    fn flushes_by_age_from_the_first_row() {
        let mut b = Batches::default();
        let t0 = Instant::now();
        b.push(&table("a"), item(0, 1), &LIMITS, t0);
        b.push(
            &table("a"),
            item(1, 1),
            &LIMITS,
            t0 + Duration::from_millis(900),
        );
        let none = std::collections::HashSet::new();
        assert_eq!(
            b.next_deadline(&LIMITS, &none),
            Some(t0 + Duration::from_secs(1))
        );
        assert_eq!(
            b.next_deadline(&LIMITS, &[table("a")].into()),
            None,
            "a busy table waits"
        );
        assert_eq!(
            b.is_due(&table("a"), &LIMITS, t0 + Duration::from_secs(1)),
            Some(Trigger::Age)
        );
        assert!(b.due(&LIMITS, t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(b.due(&LIMITS, t0 + Duration::from_secs(1)), [table("a")]);
    }
}
