//! Shared pieces of the benchmark drivers in `src/bin` (see `docs/benchmarks.md`): the example
//! payload, latency percentiles, and this process's CPU time.

use std::time::Duration;

/// A ~300-byte form body like a CRM's order status change (the size the benchmarks use).
pub fn payload(i: u64) -> String {
    let mut body = format!(
        "orderId=N{i:010}&status=delivered&previousStatus=shipped&total=120.13&currency=EUR&userId=U{i:08}&email=customer{i}%40example.com&phone=%2B4930123456&city=Berlin&country=DE&items=3&coupon=AUTUMN24&channel=web&updatedAt=2026-11-27T10%3A00%3A00Z&source=crm&note="
    );
    while body.len() < 300 {
        body.push('x');
    }
    body
}

/// p-th percentile (0..=100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// User + system CPU time this process has used.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of /proc/pid/stat; 12 and 13 after the name.
    let total = ticks(11) + ticks(12);
    Duration::from_secs_f64(total as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_about_300_bytes() {
        assert!(
            (300..=330).contains(&payload(1).len()),
            "{}",
            payload(1).len()
        );
        assert!((300..=330).contains(&payload(u64::MAX / 2).len()));
    }

    #[test]
    fn percentiles_of_a_known_list() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(51));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
    }
}
