//! A stream's time zone and the receipt day of a hit in it: the `date` column.
//!
//! The day is always computed from `received_at` (the gateway's clock at receipt), never from
//! the time the sink happens to process the message, so a backlog replayed a day later still
//! lands in the right partition.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use chrono_tz::Tz;

/// The largest offsets in use on Earth: UTC-12:00 (Baker Island) and UTC+14:00 (Line Islands).
/// Anything outside is a typo, not a zone.
const MIN_OFFSET_SECS: i32 = -12 * 3600;
const MAX_OFFSET_SECS: i32 = 14 * 3600;

/// A stream's time zone: a fixed UTC offset, or an IANA zone whose offset follows daylight
/// saving time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    Fixed(FixedOffset),
    Named(Tz),
}

/// Why a time zone string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error(
        "`{0}` is not a time zone: use a UTC offset such as `+03:00` or `-05:30`, `UTC`, or an IANA name such as `Europe/Berlin`"
    )]
    Unknown(String),
    #[error("offset `{0}` is malformed: expected `+HH:MM` or `-HH:MM` with minutes below 60")]
    MalformedOffset(String),
    #[error("offset `{0}` is outside the range of real zones, -12:00 to +14:00")]
    OffsetOutOfRange(String),
}

impl Zone {
    pub const UTC: Zone = Zone::Fixed(match FixedOffset::east_opt(0) {
        Some(z) => z,
        None => unreachable!(),
    });

    /// The calendar day, in this zone, of an instant given as Unix milliseconds. `None` only for
    /// instants outside chrono's range (about ±262,000 years), which a real clock never makes.
    pub fn date_of(&self, unix_ms: i64) -> Option<NaiveDate> {
        let utc: DateTime<Utc> = DateTime::from_timestamp_millis(unix_ms)?;
        Some(match self {
            Zone::Fixed(offset) => utc.with_timezone(offset).date_naive(),
            Zone::Named(tz) => utc.with_timezone(tz).date_naive(),
        })
    }
}

impl FromStr for Zone {
    type Err = ZoneError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        if trimmed == "UTC" || trimmed == "Z" {
            return Ok(Zone::UTC);
        }
        // "UTC+03:00" is how offset pickers (and the product we model) label offsets.
        let offset = trimmed
            .strip_prefix("UTC")
            .or_else(|| trimmed.strip_prefix("GMT"))
            .filter(|rest| rest.starts_with(['+', '-']))
            .unwrap_or(trimmed);
        if offset.starts_with(['+', '-']) {
            return parse_offset(offset).map(Zone::Fixed);
        }
        Tz::from_str(trimmed)
            .map(Zone::Named)
            .map_err(|_| ZoneError::Unknown(s.to_owned()))
    }
}

fn parse_offset(s: &str) -> Result<FixedOffset, ZoneError> {
    let malformed = || ZoneError::MalformedOffset(s.to_owned());
    let (sign, rest) = s.split_at(1);
    let (hours, minutes) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "00"),
    };
    let digits = |v: &str| !v.is_empty() && v.len() <= 2 && v.bytes().all(|b| b.is_ascii_digit());
    if !digits(hours) || minutes.len() != 2 || !digits(minutes) {
        return Err(malformed());
    }
    let hours: i32 = hours.parse().map_err(|_| malformed())?;
    let minutes: i32 = minutes.parse().map_err(|_| malformed())?;
    if minutes >= 60 {
        return Err(malformed());
    }
    let mut secs = hours * 3600 + minutes * 60;
    if sign == "-" {
        secs = -secs;
    }
    if !(MIN_OFFSET_SECS..=MAX_OFFSET_SECS).contains(&secs) {
        return Err(ZoneError::OffsetOutOfRange(s.to_owned()));
    }
    FixedOffset::east_opt(secs).ok_or_else(malformed)
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Fixed(offset) if offset.local_minus_utc() == 0 => f.write_str("UTC"),
            Zone::Fixed(offset) => write!(f, "{offset}"),
            Zone::Named(tz) => f.write_str(tz.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    fn day(zone: &str, instant: &str) -> String {
        let zone: Zone = zone.parse().unwrap();
        zone.date_of(ms(instant)).unwrap().to_string()
    }

    #[test]
    fn the_documented_example_row() {
        // DESIGN.md: received 2020-10-19 18:17:32.123 UTC, offset +00:00.
        let zone: Zone = "+00:00".parse().unwrap();
        assert_eq!(
            zone.date_of(1_603_131_452_123).unwrap().to_string(),
            "2020-10-19"
        );
        assert_eq!(day("+03:00", "2020-10-19T18:17:32.123Z"), "2020-10-19");
    }

    #[test]
    fn new_york_spring_forward_2021_moves_midnight_to_04_utc() {
        // 2021-03-14 02:00 EST became 03:00 EDT. Before: midnight is 05:00 UTC.
        assert_eq!(
            day("America/New_York", "2021-03-14T04:59:59.999Z"),
            "2021-03-13"
        );
        assert_eq!(
            day("America/New_York", "2021-03-14T05:00:00.000Z"),
            "2021-03-14"
        );
        // Across the change itself the day stays the same.
        assert_eq!(
            day("America/New_York", "2021-03-14T06:59:59.999Z"),
            "2021-03-14"
        );
        assert_eq!(
            day("America/New_York", "2021-03-14T07:00:00.000Z"),
            "2021-03-14"
        );
        // After: midnight of the 15th is 04:00 UTC (a fixed -05:00 would still say the 14th).
        assert_eq!(
            day("America/New_York", "2021-03-15T03:59:59.999Z"),
            "2021-03-14"
        );
        assert_eq!(
            day("America/New_York", "2021-03-15T04:00:00.000Z"),
            "2021-03-15"
        );
        assert_eq!(day("-05:00", "2021-03-15T04:00:00.000Z"), "2021-03-14");
    }

    #[test]
    fn new_york_fall_back_2021_moves_midnight_to_05_utc() {
        // 2021-11-07 02:00 EDT became 01:00 EST. Before: midnight is 04:00 UTC.
        assert_eq!(
            day("America/New_York", "2021-11-07T03:59:59.999Z"),
            "2021-11-06"
        );
        assert_eq!(
            day("America/New_York", "2021-11-07T04:00:00.000Z"),
            "2021-11-07"
        );
        // The repeated hour 01:00-02:00 local is still the 7th.
        assert_eq!(
            day("America/New_York", "2021-11-07T05:30:00.000Z"),
            "2021-11-07"
        );
        assert_eq!(
            day("America/New_York", "2021-11-07T06:30:00.000Z"),
            "2021-11-07"
        );
        // After: midnight of the 8th is 05:00 UTC (a fixed -04:00 would already say the 8th).
        assert_eq!(
            day("America/New_York", "2021-11-08T04:59:59.999Z"),
            "2021-11-07"
        );
        assert_eq!(
            day("America/New_York", "2021-11-08T05:00:00.000Z"),
            "2021-11-08"
        );
        assert_eq!(day("-04:00", "2021-11-08T04:30:00.000Z"), "2021-11-08");
    }

    #[test]
    fn half_hour_offset_plus_05_30() {
        assert_eq!(day("+05:30", "2020-10-19T18:29:59.999Z"), "2020-10-19");
        assert_eq!(day("+05:30", "2020-10-19T18:30:00.000Z"), "2020-10-20");
    }

    #[test]
    fn easternmost_plus_14_00() {
        assert_eq!(day("+14:00", "2020-10-19T09:59:59.999Z"), "2020-10-19");
        assert_eq!(day("+14:00", "2020-10-19T10:00:00.000Z"), "2020-10-20");
    }

    #[test]
    fn westernmost_minus_12_00() {
        assert_eq!(day("-12:00", "2020-10-19T11:59:59.999Z"), "2020-10-18");
        assert_eq!(day("-12:00", "2020-10-19T12:00:00.000Z"), "2020-10-19");
    }

    #[test]
    fn utc_midnight_edges() {
        assert_eq!(day("UTC", "2020-12-31T23:59:59.999Z"), "2020-12-31");
        assert_eq!(day("UTC", "2021-01-01T00:00:00.000Z"), "2021-01-01");
        assert_eq!(day("+03:00", "2020-12-31T20:59:59.999Z"), "2020-12-31");
        assert_eq!(day("+03:00", "2020-12-31T21:00:00.000Z"), "2021-01-01");
    }

    #[test]
    fn offset_spellings() {
        let plus3 = Zone::Fixed(FixedOffset::east_opt(3 * 3600).unwrap());
        for s in [
            "+03:00",
            "+0300",
            "+03",
            "UTC+03:00",
            "GMT+03:00",
            " +03:00 ",
        ] {
            assert_eq!(s.parse::<Zone>().unwrap(), plus3, "{s}");
        }
        assert_eq!("-05:30".parse::<Zone>().unwrap().to_string(), "-05:30");
        assert_eq!("Z".parse::<Zone>().unwrap(), Zone::UTC);
        assert_eq!("+00:00".parse::<Zone>().unwrap().to_string(), "UTC");
        // IANA names keep their own meaning, including the inverted Etc/GMT signs.
        assert_eq!(
            "Etc/GMT+3".parse::<Zone>().unwrap(),
            Zone::Named(Tz::Etc__GMTPlus3)
        );
        assert_eq!(
            "Europe/Berlin".parse::<Zone>().unwrap().to_string(),
            "Europe/Berlin"
        );
    }

    #[test]
    fn bad_zones_are_refused_with_a_reason() {
        assert!(matches!(
            "Mars/Olympus".parse::<Zone>(),
            Err(ZoneError::Unknown(_))
        ));
        assert!(matches!("".parse::<Zone>(), Err(ZoneError::Unknown(_))));
        assert!(matches!(
            "+3:0".parse::<Zone>(),
            Err(ZoneError::MalformedOffset(_))
        ));
        assert!(matches!(
            "+03:60".parse::<Zone>(),
            Err(ZoneError::MalformedOffset(_))
        ));
        assert!(matches!(
            "+03:00:00".parse::<Zone>(),
            Err(ZoneError::MalformedOffset(_))
        ));
        assert!(matches!(
            "+15:00".parse::<Zone>(),
            Err(ZoneError::OffsetOutOfRange(_))
        ));
        assert!(matches!(
            "-12:30".parse::<Zone>(),
            Err(ZoneError::OffsetOutOfRange(_))
        ));
    }
}
