//! Property tests (issue #5): whatever bytes arrive on the topic, decoding and placing them
//! never panics; a record is placed exactly when it is a well-formed envelope of a known
//! stream, with its payload byte for byte, and otherwise dead-lettered with a reason.

#![allow(clippy::unwrap_used)]

use bq_sink::row::{PlaceCache, Poison, place};
use bytes::Bytes;
use hookpipe_common::Catalogue;
use hookpipe_proto::{Envelope, Message};
use proptest::prelude::*;

const STREAM: &str = "522ed95e-9f07-45f6-a0b7-28bf2d0315e5";

fn catalogue() -> Catalogue {
    Catalogue::from_yaml(&format!(
        "streams:\n  - id: {STREAM}\n    table: local-project.offline_data.crm_orders\n    timezone: America/New_York\n"
    ))
    .unwrap()
}

/// BigQuery's DATE range, as Unix milliseconds: 0001-01-01 to 9999-12-31.
const MIN_MS: i64 = -62_135_596_800_000;
const MAX_MS: i64 = 253_402_300_799_999;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder_or_the_placer(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Envelope::decode(bytes.as_slice());
        let _ = place(&Bytes::from(bytes), &catalogue(), &mut PlaceCache::default());
    }

    #[test]
    fn an_envelope_survives_encoding_and_is_placed_exactly_when_valid(
        known_stream in any::<bool>(),
        hit_is_uuid in any::<bool>(),
        hit in any::<u128>(),
        other_stream in any::<u128>(),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        received_at_ms in prop_oneof![MIN_MS..MAX_MS, -8_000_000_000_000_000..8_000_000_000_000_000i64, any::<i64>()],
        method in "[A-Z]{0,7}",
        idempotency_key in proptest::option::of("\\PC{0,40}"),
        replayed in any::<bool>(),
        carries_placement in any::<bool>(),
    ) {
        let envelope = Envelope {
            hit_id: if hit_is_uuid { uuid::Uuid::from_u128(hit).to_string() } else { "not-a-uuid".into() },
            received_at_ms,
            stream_id: if known_stream { STREAM.into() } else { uuid::Uuid::from_u128(other_stream).to_string() },
            payload: payload.clone().into(),
            method,
            idempotency_key,
            replayed,
            // Envelopes from current gateways name the table and zone themselves; older ones
            // are placed with the sink's catalogue.
            table: if carries_placement { "local-project.d.t".into() } else { String::new() },
            timezone: if carries_placement { "America/New_York".into() } else { String::new() },
            ..Default::default()
        };
        let bytes = envelope.encode_to_vec();
        prop_assert_eq!(&Envelope::decode(bytes.as_slice()).unwrap(), &envelope);

        let utf8 = std::str::from_utf8(&payload).is_ok();
        // The receipt day in the stream's zone must be a BigQuery DATE (years 1 to 9999).
        let in_range = catalogue()
            .streams()
            .next()
            .unwrap()
            .zone
            .date_of(received_at_ms)
            .is_some_and(|d| (1..=9999).contains(&chrono::Datelike::year(&d)));
        let placeable = known_stream || carries_placement;
        match place(&Bytes::from(bytes), &catalogue(), &mut PlaceCache::default()) {
            Ok(placed) => {
                prop_assert!(placeable && hit_is_uuid && utf8 && in_range);
                prop_assert_eq!(&placed.row.payload[..], payload.as_slice());
                prop_assert_eq!(placed.row.received_at, received_at_ms);
                prop_assert_eq!(placed.row.hit_id.to_string(), envelope.hit_id);
                prop_assert_eq!(placed.replayed, replayed);
                let table = if carries_placement { "local-project.d.t" } else { "local-project.offline_data.crm_orders" };
                prop_assert_eq!(placed.table.to_string(), table);
            }
            Err((Poison::UnknownStream, _)) => prop_assert!(!placeable && hit_is_uuid),
            Err((Poison::InvalidPayload, _)) => prop_assert!(!utf8),
            Err((Poison::Undecodable, detail)) => {
                prop_assert!(!hit_is_uuid || !in_range, "{}", detail)
            }
            Err((other, detail)) => prop_assert!(false, "{:?}: {}", other, detail),
        }
    }
}
