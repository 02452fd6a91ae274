//! What the writer does after a failed write: pure, and tested with a table of cases. The
//! writer performs the actions; every choice between retry, split, dead-letter and park is
//! made here, from the error and the situation of the table.
//!
//! The rules, in words:
//! - BigQuery said which rows are bad: dead-letter exactly those, write the rest.
//! - BigQuery refused the request as a whole (HTTP 400) without naming a row: split until the
//!   bad row is alone, then dead-letter it.
//! - The table exists with columns our rows do not fit: dead-letter (an operator must fix the
//!   table; replay brings them back).
//! - A server error (5xx) is transient on BigQuery and never dead-letters a row. Only where the
//!   destination is known to answer a bad row with HTTP 500 for the whole request (the
//!   emulator; `HOOKPIPE_BIGQUERY_BAD_ROWS_AS_5XX`), the answer is exactly 500 (a 502, 503 or
//!   504 is an outage even there) and the table itself answers, the request is split to find
//!   the bad row, which is dead-lettered after repeated strikes alone.
//! - Anything else that fails (403, quota, a deleted dataset, an outage) is retried with
//!   backoff. When *this* table keeps failing for the park budget while another table was
//!   written meanwhile, or while its stuck rows hold the partitions back (pressure), its rows
//!   are parked so every other stream keeps flowing. A failure of every table (BigQuery
//!   unreachable) parks nothing: parking would help no one.
//! - When the outcome of the failed attempt is unknown (a timeout or a 5xx after the request
//!   was sent), the rows are looked up before they are sent again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hookpipe_common::TableRef;

use crate::row::Poison;
use crate::warehouse::WriteError;

/// Settings of the decisions.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// How long a table may keep failing, while other tables are written, before its rows are
    /// parked.
    pub park_after: Duration,
    /// The destination answers a request holding one bad row with HTTP 500 (the emulator's
    /// way), so a 5xx while the table answers means "find the bad row".
    pub bad_rows_as_5xx: bool,
    /// With `bad_rows_as_5xx`: how many 5xx a single row may get alone, while the table answers,
    /// before it is taken for a bad row.
    pub poison_strikes: u32,
}

/// What the writer knows when an attempt failed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Situation {
    /// Rows in the failed request.
    pub rows: usize,
    /// How long this table has been failing without a successful write.
    pub failing_for: Duration,
    /// Another table was written successfully since this one started failing.
    pub others_writing: bool,
    /// The pipeline is held back (a partition paused at the dedup window, or memory full).
    pub pressure: bool,
    /// Whether the table answered a probe right after the failure (asked only when needed).
    pub table_answers: Option<bool>,
    /// 5xx strikes the single row of this request already got while the table answered.
    pub strikes: u32,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Dead-letter these rows (indexes into the request) and write the others again.
    RejectRows(Vec<(usize, String)>),
    /// Dead-letter every row of the request.
    RejectAll(Poison, String),
    /// Split the request in two and try each half.
    Split,
    /// Ask whether the table answers, then decide again with `table_answers` set.
    ProbeTable,
    /// Count a strike against the request's single row, wait, and try it again.
    Strike,
    /// Wait (backoff) and try again. `suspect`: the failed attempt may have stored the rows, so
    /// look them up first. `recreate`: make sure the table exists first.
    Retry { suspect: bool, recreate: bool },
    /// Give up on the table for now: put the rows on the parking topic.
    Park,
}

pub fn decide(policy: &Policy, error: &WriteError, s: &Situation) -> Action {
    match error {
        WriteError::RowsRejected(rows) => Action::RejectRows(rows.clone()),
        WriteError::RequestRejected(_) if s.rows > 1 => Action::Split,
        WriteError::RequestRejected(detail) => {
            Action::RejectAll(Poison::RejectedByBigQuery, detail.clone())
        }
        WriteError::SchemaMismatch(detail) => {
            Action::RejectAll(Poison::SchemaMismatch, detail.clone())
        }
        WriteError::ServerError {
            status: 500,
            detail,
        } if policy.bad_rows_as_5xx => match s.table_answers {
            None => Action::ProbeTable,
            Some(true) if s.rows > 1 => Action::Split,
            Some(true) if s.strikes + 1 >= policy.poison_strikes => Action::RejectAll(
                Poison::RejectedByBigQuery,
                format!(
                    "BigQuery answered this row alone with a server error {} times while the table answered: {detail}",
                    policy.poison_strikes
                ),
            ),
            Some(true) => Action::Strike,
            // The table does not answer either: an outage, and on the emulator a 500 means
            // nothing was stored, so no lookup is needed.
            Some(false) => failing(policy, s, false, false),
        },
        WriteError::TableMissing => failing(policy, s, false, true),
        other => failing(policy, s, other.is_ambiguous(), false),
    }
}

/// A failure of the table rather than of rows: retry, or park once the budget is spent.
fn failing(policy: &Policy, s: &Situation, suspect: bool, recreate: bool) -> Action {
    if s.others_writing && (s.failing_for >= policy.park_after || s.pressure) {
        Action::Park
    } else {
        Action::Retry { suspect, recreate }
    }
}

/// Each table's failure streak and parking state, shared by the flush tasks: the evidence
/// behind `Situation::failing_for` and `others_writing`, and when a parked table is tried again.
#[derive(Debug)]
pub struct Health {
    tables: HashMap<TableRef, TableHealth>,
    /// First wait before a parked table's rows are tried again; doubles up to `probe_max`.
    probe_initial: Duration,
    probe_max: Duration,
}

#[derive(Debug, Default)]
struct TableHealth {
    /// Since when the table has failed without a success in between.
    failing_since: Option<Instant>,
    last_success: Option<Instant>,
    /// While parked: when its rows are tried again, and the wait after that.
    parked: Option<(Instant, Duration)>,
}

impl Health {
    pub fn new(probe_initial: Duration, probe_max: Duration) -> Self {
        Self {
            tables: HashMap::new(),
            probe_initial,
            probe_max,
        }
    }

    /// Records a failure; returns how long the table has been failing, and whether another
    /// table was written successfully since it started to.
    pub fn failed(&mut self, table: &TableRef, now: Instant) -> (Duration, bool) {
        let since = *self
            .tables
            .entry(table.clone())
            .or_default()
            .failing_since
            .get_or_insert(now);
        let others = self
            .tables
            .iter()
            .any(|(t, h)| t != table && h.last_success.is_some_and(|s| s >= since));
        (now.saturating_duration_since(since), others)
    }

    /// Records a success; returns true when the table was parked (its parked rows can now be
    /// written back).
    pub fn succeeded(&mut self, table: &TableRef, now: Instant) -> bool {
        let health = self.tables.entry(table.clone()).or_default();
        health.failing_since = None;
        health.last_success = Some(now);
        health.parked.take().is_some()
    }

    /// Records that the table's rows were parked: its next rows go to the parking topic at
    /// once until the probe time, when a batch is tried again (with a doubled wait after it).
    pub fn parked(&mut self, table: &TableRef, now: Instant) {
        let (initial, max) = (self.probe_initial, self.probe_max);
        let health = self.tables.entry(table.clone()).or_default();
        let wait = match health.parked {
            Some((_, wait)) => (wait * 2).min(max),
            None => initial,
        };
        health.parked = Some((now + wait, wait));
    }

    /// Whether rows for the table go straight to parking (parked, and not yet time to try).
    pub fn park_at_once(&self, table: &TableRef, now: Instant) -> bool {
        self.tables
            .get(table)
            .and_then(|h| h.parked)
            .is_some_and(|(probe_at, _)| now < probe_at)
    }

    /// The tables parked now.
    pub fn parked_tables(&self) -> Vec<TableRef> {
        let mut out: Vec<TableRef> = self
            .tables
            .iter()
            .filter(|(_, h)| h.parked.is_some())
            .map(|(t, _)| t.clone())
            .collect();
        out.sort_by_key(|t| t.to_string());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROD: Policy = Policy {
        park_after: Duration::from_secs(60),
        bad_rows_as_5xx: false,
        poison_strikes: 3,
    };
    const EMULATOR: Policy = Policy {
        bad_rows_as_5xx: true,
        ..PROD
    };

    fn s(rows: usize) -> Situation {
        Situation {
            rows,
            ..Situation::default()
        }
    }

    fn server() -> WriteError {
        WriteError::ServerError {
            status: 500,
            detail: "HTTP 500 internalError".into(),
        }
    }

    fn unavailable() -> WriteError {
        WriteError::ServerError {
            status: 503,
            detail: "HTTP 503 backendError".into(),
        }
    }

    #[test]
    fn bad_rows_named_by_bigquery_are_rejected_exactly() {
        let rows = vec![(1, "invalid: bad date".to_owned())];
        assert_eq!(
            decide(&PROD, &WriteError::RowsRejected(rows.clone()), &s(5)),
            Action::RejectRows(rows)
        );
    }

    #[test]
    fn a_rejected_request_is_split_until_the_row_is_alone() {
        let e = WriteError::RequestRejected("invalid".into());
        assert_eq!(decide(&PROD, &e, &s(8)), Action::Split);
        assert_eq!(
            decide(&PROD, &e, &s(1)),
            Action::RejectAll(Poison::RejectedByBigQuery, "invalid".into())
        );
    }

    #[test]
    fn a_misfit_table_dead_letters_its_rows() {
        let e = WriteError::SchemaMismatch("payload is INT64".into());
        assert_eq!(
            decide(&PROD, &e, &s(3)),
            Action::RejectAll(Poison::SchemaMismatch, "payload is INT64".into())
        );
    }

    /// The 5xx storm: in production a 5xx never dead-letters a row, however long; and
    /// even on the emulator a 503 is an outage, not a bad row.
    #[test]
    fn a_5xx_storm_is_retried_and_never_rejects_a_row() {
        for (policy, error) in [
            (PROD, server()),
            (PROD, unavailable()),
            (EMULATOR, unavailable()),
        ] {
            for rows in [1, 2, 500] {
                for strikes in [0, 2, 100] {
                    let situation = Situation {
                        rows,
                        strikes,
                        table_answers: Some(true),
                        failing_for: Duration::from_secs(30),
                        ..Situation::default()
                    };
                    assert_eq!(
                        decide(&policy, &error, &situation),
                        Action::Retry {
                            suspect: true,
                            recreate: false
                        },
                        "{error}: {rows} rows, {strikes} strikes"
                    );
                }
            }
        }
    }

    #[test]
    fn on_the_emulator_a_5xx_while_the_table_answers_hunts_the_bad_row() {
        assert_eq!(decide(&EMULATOR, &server(), &s(4)), Action::ProbeTable);
        let answers = |rows, strikes| Situation {
            rows,
            strikes,
            table_answers: Some(true),
            ..Situation::default()
        };
        assert_eq!(decide(&EMULATOR, &server(), &answers(4, 0)), Action::Split);
        assert_eq!(decide(&EMULATOR, &server(), &answers(1, 0)), Action::Strike);
        assert_eq!(decide(&EMULATOR, &server(), &answers(1, 1)), Action::Strike);
        assert!(matches!(
            decide(&EMULATOR, &server(), &answers(1, 2)),
            Action::RejectAll(Poison::RejectedByBigQuery, _)
        ));
        let down = Situation {
            rows: 4,
            table_answers: Some(false),
            ..Situation::default()
        };
        assert_eq!(
            decide(&EMULATOR, &server(), &down),
            Action::Retry {
                suspect: false,
                recreate: false
            }
        );
    }

    /// The 403 for one table: retried within the budget, parked after it, but only
    /// while other tables are written (one table's trouble must not stop the others).
    #[test]
    fn a_table_failing_past_the_budget_while_others_write_is_parked() {
        let denied = WriteError::Denied("HTTP 403 accessDenied".into());
        let at = |secs, others_writing, pressure| Situation {
            rows: 10,
            failing_for: Duration::from_secs(secs),
            others_writing,
            pressure,
            ..Situation::default()
        };
        let retry = Action::Retry {
            suspect: false,
            recreate: false,
        };
        assert_eq!(decide(&PROD, &denied, &at(59, true, false)), retry);
        assert_eq!(decide(&PROD, &denied, &at(60, true, false)), Action::Park);
        assert_eq!(
            decide(&PROD, &denied, &at(1, true, true)),
            Action::Park,
            "stuck rows holding the partitions back are parked at once"
        );
        assert_eq!(
            decide(&PROD, &denied, &at(3600, false, true)),
            retry,
            "when every table fails, parking helps no one"
        );
        assert_eq!(decide(&PROD, &server(), &at(60, true, false)), Action::Park);
        assert_eq!(
            decide(&PROD, &WriteError::TableMissing, &at(1, false, false)),
            Action::Retry {
                suspect: false,
                recreate: true
            }
        );
    }

    #[test]
    fn an_answer_lost_after_sending_makes_the_rows_suspect() {
        let lost = WriteError::Ambiguous("timed out after sending".into());
        assert_eq!(
            decide(&PROD, &lost, &s(10)),
            Action::Retry {
                suspect: true,
                recreate: false
            }
        );
        let refused = WriteError::Transient("connection refused".into());
        assert_eq!(
            decide(&PROD, &refused, &s(10)),
            Action::Retry {
                suspect: false,
                recreate: false
            }
        );
    }

    fn t(name: &str) -> TableRef {
        format!("p.d.{name}").parse().unwrap()
    }

    #[test]
    fn a_failure_streak_knows_whether_other_tables_were_written_meanwhile() {
        let mut h = Health::new(Duration::from_secs(5), Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        h.succeeded(&t("b"), at(0));
        assert_eq!(h.failed(&t("a"), at(1)), (Duration::ZERO, false));
        assert_eq!(
            h.failed(&t("a"), at(3)),
            (Duration::from_secs(2), false),
            "b's success came before a started failing"
        );
        h.succeeded(&t("b"), at(4));
        assert_eq!(h.failed(&t("a"), at(5)), (Duration::from_secs(4), true));
        assert!(!h.succeeded(&t("a"), at(6)), "a was not parked");
        assert_eq!(
            h.failed(&t("a"), at(7)),
            (Duration::ZERO, false),
            "new streak"
        );
    }

    #[test]
    fn a_parked_table_is_tried_again_after_a_doubling_wait_until_it_answers() {
        let mut h = Health::new(Duration::from_secs(5), Duration::from_secs(12));
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        h.parked(&t("a"), at(0));
        assert!(h.park_at_once(&t("a"), at(4)));
        assert!(!h.park_at_once(&t("a"), at(5)), "probe due");
        assert!(!h.park_at_once(&t("b"), at(1)));
        h.parked(&t("a"), at(5));
        assert!(h.park_at_once(&t("a"), at(14)));
        assert!(!h.park_at_once(&t("a"), at(15)));
        h.parked(&t("a"), at(15));
        assert!(h.park_at_once(&t("a"), at(26)), "capped at 12 s");
        assert!(!h.park_at_once(&t("a"), at(27)));
        assert_eq!(h.parked_tables(), [t("a")]);
        assert!(h.succeeded(&t("a"), at(28)), "it was parked");
        assert!(!h.park_at_once(&t("a"), at(28)));
        assert!(h.parked_tables().is_empty());
    }
}
