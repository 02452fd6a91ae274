//! Property tests (issue #5): the catalogue parser never panics and keeps what a valid file
//! says; a stream's `date` agrees with an independent computation for any instant and zone.

#![allow(clippy::unwrap_used)]

use chrono::{Datelike, NaiveDate, Offset, TimeZone};
use hookpipe_common::Catalogue;
use hookpipe_common::zone::Zone;
use proptest::prelude::*;

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's `civil_from_days`: integer
/// arithmetic only, so it shares nothing with chrono's calendar code.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The day at `unix_ms` for a zone `offset_secs` east of UTC.
fn reference_day(unix_ms: i64, offset_secs: i64) -> (i64, u32, u32) {
    civil_from_days((unix_ms + offset_secs * 1000).div_euclid(86_400_000))
}

fn ymd(date: NaiveDate) -> (i64, u32, u32) {
    (i64::from(date.year()), date.month(), date.day())
}

/// Instants from year 1 to 9999 (BigQuery's DATE range).
const MIN_MS: i64 = -62_135_596_800_000;
const MAX_MS: i64 = 253_402_300_799_999;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn date_for_a_fixed_offset_agrees_with_integer_arithmetic(
        unix_ms in MIN_MS..MAX_MS,
        minutes in -12 * 60..=14 * 60i64,
    ) {
        let text = format!(
            "{}{:02}:{:02}",
            if minutes < 0 { '-' } else { '+' },
            minutes.abs() / 60,
            minutes.abs() % 60
        );
        let zone: Zone = text.parse().unwrap();
        let date = zone.date_of(unix_ms).unwrap();
        prop_assert_eq!(ymd(date), reference_day(unix_ms, minutes * 60), "{} at {}", text, unix_ms);
    }

    #[test]
    fn date_for_a_named_zone_agrees_with_its_utc_offset_at_that_instant(
        unix_ms in MIN_MS..MAX_MS,
        index in 0..chrono_tz::TZ_VARIANTS.len(),
    ) {
        let tz = chrono_tz::TZ_VARIANTS[index];
        let zone: Zone = tz.name().parse().unwrap();
        let utc = chrono::Utc.timestamp_millis_opt(unix_ms).unwrap().naive_utc();
        let offset = i64::from(tz.offset_from_utc_datetime(&utc).fix().local_minus_utc());
        let date = zone.date_of(unix_ms).unwrap();
        prop_assert_eq!(ymd(date), reference_day(unix_ms, offset), "{} at {}", tz.name(), unix_ms);
    }

    #[test]
    fn any_text_is_parsed_or_refused_without_panicking(text in "\\PC{0,400}") {
        let _ = Catalogue::from_yaml(&text);
    }

    #[test]
    fn yaml_shaped_garbage_is_refused_or_parsed_without_panicking(
        lines in proptest::collection::vec(
            "(streams:|  - id: [0-9a-f-]{0,40}|    table: [a-z.:_-]{0,30}|    timezone: \"?[A-Za-z/+:0-9-]{0,20}\"?|    auth:|      type: [a-z0-9-]{0,12}|      secrets: \\[\\{env: [A-Z_]{0,8}\\}\\]|      tolerance_seconds: -?[0-9]{0,12}|[ -~]{0,30})",
            0..20,
        )
    ) {
        let _ = Catalogue::from_yaml(&lines.join("\n"));
    }

    #[test]
    fn a_valid_catalogue_parses_to_exactly_what_it_says(
        streams in proptest::collection::vec(
            (
                any::<u128>().prop_filter("not nil", |n| *n != 0),
                "[a-z][a-z0-9-]{4,20}",
                "[A-Za-z_][A-Za-z0-9_]{0,30}",
                "[A-Za-z0-9_][A-Za-z0-9_-]{0,40}",
                prop_oneof![
                    Just("UTC".to_owned()),
                    (-12i32..=14).prop_map(|h| format!("{}{:02}:00", if h < 0 { '-' } else { '+' }, h.abs())),
                    (0..chrono_tz::TZ_VARIANTS.len()).prop_map(|i| chrono_tz::TZ_VARIANTS[i].name().to_owned()),
                ],
            ),
            1..8,
        )
    ) {
        let ids: std::collections::HashSet<u128> = streams.iter().map(|s| s.0).collect();
        prop_assume!(ids.len() == streams.len());
        let mut text = String::from("streams:\n");
        for (id, project, dataset, table, zone) in &streams {
            text.push_str(&format!(
                "  - id: {}\n    table: {project}.{dataset}.{table}\n    timezone: \"{zone}\"\n",
                uuid::Uuid::from_u128(*id)
            ));
        }
        let catalogue = Catalogue::from_yaml(&text).unwrap();
        prop_assert_eq!(catalogue.len(), streams.len());
        for ((id, project, dataset, table, zone), parsed) in streams.iter().zip(catalogue.streams()) {
            prop_assert_eq!(parsed.id, uuid::Uuid::from_u128(*id));
            prop_assert_eq!(parsed.table.to_string(), format!("{project}.{dataset}.{table}"));
            prop_assert_eq!(parsed.zone, zone.parse::<Zone>().unwrap());
        }
        // The same id twice is refused, naming both entries.
        let (id, ..) = &streams[0];
        let twice = format!("{text}  - id: {}\n    table: p-p.d.t\n    timezone: UTC\n", uuid::Uuid::from_u128(*id));
        let refused = Catalogue::from_yaml(&twice).unwrap_err().to_string();
        prop_assert!(refused.contains("already used by streams[0]"), "{}", refused);
    }
}

#[test]
fn the_reference_itself_matches_known_days() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(-1), (1969, 12, 31));
    assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    assert_eq!(reference_day(1_603_131_452_123, 3 * 3600), (2020, 10, 19));
}
