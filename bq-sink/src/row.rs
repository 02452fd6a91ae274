//! Turning one consumed record into a BigQuery row, or into the reason it cannot be one.
//! Pure: the catalogue is passed in, nothing is read or written.
//!
//! A record is held once: the row's payload is a slice of the record's own bytes (prost decodes
//! `bytes` fields from a `Bytes` buffer without copying), so a buffered record costs its size
//! once, not twice.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{Datelike, NaiveDate};
use hookpipe_common::{Catalogue, TableRef, Zone};
use hookpipe_proto::{Envelope, Message};
use uuid::Uuid;

/// A row of a stream's table, exactly the schema in DESIGN.md.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub hit_id: Uuid,
    /// The payload, checked to be UTF-8 (BigQuery STRING); a slice of the record's bytes.
    pub payload: Bytes,
    /// Unix milliseconds at receipt.
    pub received_at: i64,
    /// Receipt day in the stream's zone.
    pub date: NaiveDate,
}

impl Row {
    /// Approximate size of the row in a write request, for the batch byte limit.
    pub fn approx_bytes(&self) -> usize {
        // Field names, quotes, the insertId and JSON escaping of a typical payload.
        self.payload.len() + 168
    }

    /// The payload as text. Checked when the record was placed, so this cannot fail; it is
    /// checked again rather than trusted because `unsafe` is not used in this workspace.
    pub fn payload_str(&self) -> &str {
        std::str::from_utf8(&self.payload).unwrap_or_default()
    }
}

/// insertAll's JSON form of a row.
impl serde::Serialize for Row {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut id = Uuid::encode_buffer();
        let mut st = s.serialize_struct("Row", 4)?;
        st.serialize_field("hit_id", self.hit_id.hyphenated().encode_lower(&mut id))?;
        st.serialize_field("payload", self.payload_str())?;
        st.serialize_field("received_at", &self.received_at)?;
        st.serialize_field("date", &self.date)?;
        st.end()
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

    /// The reasons, for metrics that start every label value at 0.
    pub const ALL: [Poison; 5] = [
        Poison::Undecodable,
        Poison::UnknownStream,
        Poison::InvalidPayload,
        Poison::RejectedByBigQuery,
        Poison::SchemaMismatch,
    ];
}

/// A decoded record: where it goes and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub stream_id: Uuid,
    /// Put back by replay-dlq or from the parking topic: may already be in the table.
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

/// Parsed table names and zones from envelopes, so a record does not parse the same strings
/// again. Bounded: cleared when it grows past `MAX` (a catalogue has far fewer streams).
#[derive(Debug, Default)]
pub struct PlaceCache {
    tables: HashMap<String, TableRef>,
    zones: HashMap<String, Zone>,
}

impl PlaceCache {
    const MAX: usize = 10_000;

    fn table(&mut self, text: &str) -> Option<TableRef> {
        if let Some(t) = self.tables.get(text) {
            return Some(t.clone());
        }
        let parsed: TableRef = text.parse().ok()?;
        if self.tables.len() >= Self::MAX {
            self.tables.clear();
        }
        self.tables.insert(text.to_owned(), parsed.clone());
        Some(parsed)
    }

    fn zone(&mut self, text: &str) -> Option<Zone> {
        if let Some(z) = self.zones.get(text) {
            return Some(*z);
        }
        let parsed: Zone = text.parse().ok()?;
        if self.zones.len() >= Self::MAX {
            self.zones.clear();
        }
        self.zones.insert(text.to_owned(), parsed);
        Some(parsed)
    }
}

/// Decodes a record value and places it in its stream's table: with the table and zone the
/// gateway wrote into the envelope at receipt, or, for envelopes written before those fields
/// existed, with the sink's catalogue.
pub fn place(
    value: &Bytes,
    catalogue: &Catalogue,
    cache: &mut PlaceCache,
) -> Result<Placed, (Poison, String)> {
    let envelope = Envelope::decode(value.clone())
        .map_err(|e| (Poison::Undecodable, format!("not an envelope: {e}")))?;
    let stream_id = Uuid::try_parse(&envelope.stream_id)
        .map_err(|_| (Poison::Undecodable, "stream_id is not a UUID".to_owned()))?;
    let hit_id = Uuid::try_parse(&envelope.hit_id)
        .map_err(|_| (Poison::Undecodable, "hit_id is not a UUID".to_owned()))?;
    let (table, zone) = if envelope.table.is_empty() || envelope.timezone.is_empty() {
        let stream = catalogue.get(&stream_id).ok_or_else(|| {
            (
                Poison::UnknownStream,
                format!("stream {stream_id} is not in the catalogue"),
            )
        })?;
        (stream.table.clone(), stream.zone)
    } else {
        let table = cache.table(&envelope.table).ok_or_else(|| {
            (
                Poison::Undecodable,
                format!("table `{}` is not project.dataset.table", envelope.table),
            )
        })?;
        let zone = cache.zone(&envelope.timezone).ok_or_else(|| {
            (
                Poison::Undecodable,
                format!("timezone `{}` is not a time zone", envelope.timezone),
            )
        })?;
        (table, zone)
    };
    // BigQuery's DATE holds years 1 to 9999; a row outside would fail the whole insert.
    let date = zone
        .date_of(envelope.received_at_ms)
        .filter(|d| (1..=9999).contains(&d.year()))
        .ok_or_else(|| {
            (
                Poison::Undecodable,
                format!("received_at {} is out of range", envelope.received_at_ms),
            )
        })?;
    if std::str::from_utf8(&envelope.payload).is_err() {
        return Err((Poison::InvalidPayload, "payload is not UTF-8".to_owned()));
    }
    Ok(Placed {
        stream_id,
        replayed: envelope.replayed,
        table,
        row: Row {
            hit_id,
            payload: envelope.payload,
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

    fn envelope(stream: &str, payload: &[u8], at: i64) -> Bytes {
        Envelope {
            hit_id: "83cc2a6a-4829-4410-bab4-95b680c5b8d7".into(),
            received_at_ms: at,
            stream_id: stream.into(),
            payload: payload.to_vec().into(),
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    fn place_it(value: &Bytes, c: &Catalogue) -> Result<Placed, (Poison, String)> {
        place(value, c, &mut PlaceCache::default())
    }

    #[test]
    fn the_documented_row() {
        let value = envelope(
            STREAM,
            b"orderId=N1&status=delivered&total=120.13&userId=U1",
            1_603_131_452_123,
        );
        let placed = place_it(&value, &catalogue()).unwrap();
        assert_eq!(
            placed.table.to_string(),
            "local-project.offline_data.crm_orders"
        );
        assert_eq!(
            placed.row.hit_id.to_string(),
            "83cc2a6a-4829-4410-bab4-95b680c5b8d7"
        );
        assert_eq!(
            placed.row.payload_str(),
            "orderId=N1&status=delivered&total=120.13&userId=U1"
        );
        assert_eq!(placed.row.received_at, 1_603_131_452_123);
        assert_eq!(placed.row.date.to_string(), "2020-10-19");
        let json = serde_json::to_value(&placed.row).unwrap();
        assert_eq!(json["date"], "2020-10-19");
        assert_eq!(json["hit_id"], "83cc2a6a-4829-4410-bab4-95b680c5b8d7");
        assert_eq!(
            json["payload"],
            "orderId=N1&status=delivered&total=120.13&userId=U1"
        );
        assert_eq!(json["received_at"], 1_603_131_452_123_i64);
    }

    #[test]
    fn the_payload_is_a_slice_of_the_record_not_a_copy() {
        let value = envelope(STREAM, b"orderId=N1&status=delivered", 1);
        let placed = place_it(&value, &catalogue()).unwrap();
        let inside = value.as_ptr_range();
        assert!(inside.contains(&placed.row.payload.as_ptr()));
    }

    #[test]
    fn the_date_is_the_receipt_day_in_the_stream_zone() {
        // 22:00 UTC is 01:00 the next day at +03:00.
        let placed = place_it(&envelope(STREAM, b"a=1", 1_603_144_800_000), &catalogue()).unwrap();
        assert_eq!(placed.row.date.to_string(), "2020-10-20");
    }

    fn envelope_with(stream: &str, table: &str, zone: &str, at: i64) -> Bytes {
        Envelope {
            hit_id: "83cc2a6a-4829-4410-bab4-95b680c5b8d7".into(),
            received_at_ms: at,
            stream_id: stream.into(),
            payload: b"a=1".to_vec().into(),
            table: table.into(),
            timezone: zone.into(),
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    /// The ConfigMap skew: the gateway knows a stream the sink's catalogue does not yet.
    #[test]
    fn the_envelopes_table_and_zone_win_over_the_catalogue() {
        let unknown = "0b7c7c8e-3f7e-4c59-9a53-5d7f0f1f2b10";
        let value = envelope_with(
            unknown,
            "p.d.new_table",
            "America/New_York",
            1_603_144_800_000,
        );
        let placed = place_it(&value, &catalogue()).unwrap();
        assert_eq!(placed.table.to_string(), "p.d.new_table");
        // 22:00 UTC is 18:00 the same day in New York.
        assert_eq!(placed.row.date.to_string(), "2020-10-19");
        // A zone change in the sink's catalogue does not move a hit received before it.
        let known = envelope_with(STREAM, "p.d.t", "UTC", 1_603_144_800_000);
        assert_eq!(
            place_it(&known, &catalogue()).unwrap().row.date.to_string(),
            "2020-10-19"
        );
        let bad = envelope_with(STREAM, "no-dots", "UTC", 1);
        assert_eq!(
            place_it(&bad, &catalogue()).unwrap_err().0,
            Poison::Undecodable
        );
        let bad = envelope_with(STREAM, "p.d.t", "Mars/Olympus", 1);
        assert_eq!(
            place_it(&bad, &catalogue()).unwrap_err().0,
            Poison::Undecodable
        );
    }

    /// Found by the property test: BigQuery's DATE stops at years 1 and 9999, and a row outside
    /// would fail its whole batch; such a record is dead-lettered up front.
    #[test]
    fn a_receipt_day_outside_bigquerys_date_range_is_undecodable() {
        let c = catalogue();
        // 0001-01-01T00:00:00Z is 03:00 on year 1's first day at +03:00: kept.
        assert!(place_it(&envelope(STREAM, b"a=1", -62_135_596_800_000), &c).is_ok());
        // One day before: 0000-12-31 even at +03:00.
        let before = -62_135_596_800_000 - 86_400_000;
        assert_eq!(
            place_it(&envelope(STREAM, b"a=1", before), &c)
                .unwrap_err()
                .0,
            Poison::Undecodable
        );
        // 10000-01-01 at +03:00.
        assert_eq!(
            place_it(&envelope(STREAM, b"a=1", 253_402_300_800_000), &c)
                .unwrap_err()
                .0,
            Poison::Undecodable
        );
    }

    #[test]
    fn poison_kinds() {
        let c = catalogue();
        assert_eq!(
            place_it(&Bytes::from_static(b"\xff\xff\xff"), &c)
                .unwrap_err()
                .0,
            Poison::Undecodable
        );
        assert_eq!(
            place_it(
                &envelope("0b7c7c8e-3f7e-4c59-9a53-5d7f0f1f2b10", b"a", 1),
                &c
            )
            .unwrap_err()
            .0,
            Poison::UnknownStream
        );
        assert_eq!(
            place_it(&envelope(STREAM, b"\xff", 1), &c).unwrap_err().0,
            Poison::InvalidPayload
        );
        assert_eq!(
            place_it(&envelope("nope", b"a", 1), &c).unwrap_err().0,
            Poison::Undecodable
        );
    }
}
