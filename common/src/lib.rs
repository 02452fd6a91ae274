//! Code both binaries share, so that the gateway and the sink can never disagree on what a
//! stream is, which day a hit belongs to, or how Kafka is reached.

pub mod admin;
pub mod catalogue;
pub mod kafka;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod zone;

pub use catalogue::{Catalogue, CatalogueError, Stream, TableRef};
pub use secret::Secret;
pub use zone::Zone;

/// Unix time now in milliseconds, the unit of `received_at`.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Parses a duration setting: `250ms`, `5s`, `2m`, `1h`, or a bare number of seconds. Used by
/// both binaries' configuration so every duration is written the same way.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 500ms, 5s, 2m or 1h"))?;
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "`{s}` is not a duration such as 500ms, 5s, 2m or 1h"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(
            super::parse_duration("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(super::parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(super::parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(super::parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(super::parse_duration("5 parsecs").is_err());
        assert!(super::parse_duration("-1s").is_err());
        assert!(super::parse_duration("").is_err());
    }
}
