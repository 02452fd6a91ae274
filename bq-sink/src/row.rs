//! Turning one consumed record into a BigQuery row, or into the reason it cannot be one.
//! Pure: the catalogue is passed in, nothing is read or written.

use chrono::{Datelike, NaiveDate};
use hookpipe_common::{Catalogue, TableRef};
use hookpipe_proto::{Envelope, Message};
use uuid::Uuid;

/// A row of a stream's table, exactly the schema in DESIGN.md.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub hit_id: String,
    pub payload: String,
    /// Unix milliseconds at receipt.
    pub received_at: i64,
    /// Receipt day in the stream's zone.
    pub date: NaiveDate,
}

impl Row {
    /// Approximate size in an insertAll request, for the batch byte limit.
    pub fn approx_bytes(&self) -> usize {
        // Field names, quotes, the insertId and JSON escaping of a typical payload.
        self.hit_id.len() * 2 + self.payload.len() + 96
    }
}

/// Why a record is dead-lettered. The string is the `reason` of the dead letter and the value
/// of the `reason` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poison {
    Undecodable,
    UnknownStream,
    InvalidPayload,
    RejectedByBigQuery,
    SchemaMismatch,
}

impl Poison {
    pub fn as_str(self) -> &'static str {
        match self {
            Poison::Undecodable => "undecodable",
            Poison::UnknownStream => "unknown_stream",
            Poison::InvalidPayload => "invalid_payload",
            Poison::RejectedByBigQuery => "rejected_by_bigquery",
            Poison::SchemaMismatch => "schema_mismatch",
        }
    }
}

/// A decoded record: where it goes and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub stream_id: Uuid,
    /// Put back by replay-dlq: may already be in the table.
    pub replayed: bool,
    pub table: TableRef,
    pub row: Row,
}

/// The envelope's stream and receipt time, when it decodes, for dead letters and replay filters.
pub fn envelope_facts(value: &[u8]) -> Option<(String, i64)> {
    Envelope::decode(value)
        .ok()
        .map(|e| (e.stream_id, e.received_at_ms))
}

/// Decodes a record value and places it in its stream's table.
pub fn place(value: &[u8], catalogue: &Catalogue) -> Result<Placed, (Poison, String)> {
    let envelope = Envelope::decode(value)
        .map_err(|e| (Poison::Undecodable, format!("not an envelope: {e}")))?;
    let stream_id = Uuid::try_parse(&envelope.stream_id)
        .map_err(|_| (Poison::Undecodable, "stream_id is not a UUID".to_owned()))?;
    if Uuid::try_parse(&envelope.hit_id).is_err() {
        return Err((Poison::Undecodable, "hit_id is not a UUID".to_owned()));
    }
    let stream = catalogue.get(&stream_id).ok_or_else(|| {
        (
            Poison::UnknownStream,
            format!("stream {stream_id} is not in the catalogue"),
        )
    })?;
    // BigQuery's DATE holds years 1 to 9999; a row outside would fail the whole insert.
    let date = stream
        .zone
        .date_of(envelope.received_at_ms)
        .filter(|d| (1..=9999).contains(&d.year()))
        .ok_or_else(|| {
            (
                Poison::Undecodable,
                format!("received_at {} is out of range", envelope.received_at_ms),
            )
        })?;
    let payload = String::from_utf8(envelope.payload.to_vec())
        .map_err(|_| (Poison::InvalidPayload, "payload is not UTF-8".to_owned()))?;
    Ok(Placed {
        stream_id,
        replayed: envelope.replayed,
        table: stream.table.clone(),
        row: Row {
            hit_id: envelope.hit_id,
            payload,
            received_at: envelope.received_at_ms,
            date,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "522ed95e-9f07-45f6-a0b7-28bf2d0315e5";

    fn catalogue() -> Catalogue {
        Catalogue::from_yaml(&format!(
            "streams:\n  - id: {STREAM}\n    table: local-project.offline_data.crm_orders\n    timezone: \"+03:00\"\n"
        ))
        .unwrap()
    }

    fn envelope(stream: &str, payload: &[u8], at: i64) -> Vec<u8> {
        Envelope {
            hit_id: "83cc2a6a-4829-4410-bab4-95b680c5b8d7".into(),
            received_at_ms: at,
            stream_id: stream.into(),
            payload: payload.to_vec().into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn the_documented_row() {
        let placed = place(
            &envelope(
                STREAM,
                b"orderId=N1&status=delivered&total=120.13&userId=U1",
                1_603_131_452_123,
            ),
            &catalogue(),
        )
        .unwrap();
        assert_eq!(
            placed.table.to_string(),
            "local-project.offline_data.crm_orders"
        );
        assert_eq!(placed.row.hit_id, "83cc2a6a-4829-4410-bab4-95b680c5b8d7");
        assert_eq!(
            placed.row.payload,
            "orderId=N1&status=delivered&total=120.13&userId=U1"
        );
        assert_eq!(placed.row.received_at, 1_603_131_452_123);
        assert_eq!(placed.row.date.to_string(), "2020-10-19");
        let json = serde_json::to_value(&placed.row).unwrap();
        assert_eq!(json["date"], "2020-10-19");
        assert_eq!(json["received_at"], 1_603_131_452_123_i64);
    }

    #[test]
    fn the_date_is_the_receipt_day_in_the_stream_zone() {
        // 22:00 UTC is 01:00 the next day at +03:00.
        let placed = place(&envelope(STREAM, b"a=1", 1_603_144_800_000), &catalogue()).unwrap();
        assert_eq!(placed.row.date.to_string(), "2020-10-20");
    }

    /// Found by the property test: BigQuery's DATE stops at years 1 and 9999, and a row outside
    /// would fail its whole batch; such a record is dead-lettered up front.
    #[test]
    fn a_receipt_day_outside_bigquerys_date_range_is_undecodable() {
        let c = catalogue();
        // 0001-01-01T00:00:00Z is 03:00 on year 1's first day at +03:00: kept.
        assert!(place(&envelope(STREAM, b"a=1", -62_135_596_800_000), &c).is_ok());
        // One day before: 0000-12-31 even at +03:00.
        let before = -62_135_596_800_000 - 86_400_000;
        assert_eq!(
            place(&envelope(STREAM, b"a=1", before), &c).unwrap_err().0,
            Poison::Undecodable
        );
        // 10000-01-01 at +03:00.
        assert_eq!(
            place(&envelope(STREAM, b"a=1", 253_402_300_800_000), &c)
                .unwrap_err()
                .0,
            Poison::Undecodable
        );
    }

    #[test]
    fn poison_kinds() {
        let c = catalogue();
        assert_eq!(
            place(b"\xff\xff\xff", &c).unwrap_err().0,
            Poison::Undecodable
        );
        assert_eq!(
            place(
                &envelope("0b7c7c8e-3f7e-4c59-9a53-5d7f0f1f2b10", b"a", 1),
                &c
            )
            .unwrap_err()
            .0,
            Poison::UnknownStream
        );
        assert_eq!(
            place(&envelope(STREAM, b"\xff", 1), &c).unwrap_err().0,
            Poison::InvalidPayload
        );
        assert_eq!(
            place(&envelope("nope", b"a", 1), &c).unwrap_err().0,
            Poison::Undecodable
        );
    }
}
