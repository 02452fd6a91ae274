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

/// Which part of a producer process a thread is, by its name: librdkafka's own threads
/// (`rdk:main`, `rdk:broker…`), the rdkafka crate's delivery-report thread (`producer
/// pollin[g thread]`), and everything else (the runtime's workers: HTTP, envelopes, the
/// caller's side of produce). `bench/run` sorts the gateway's threads the same way.
pub fn thread_kind(name: &str) -> &'static str {
    if name.starts_with("rdk:") {
        "librdkafka"
    } else if name.starts_with("producer poll") {
        "delivery reports"
    } else {
        "runtime"
    }
}

/// CPU time of this process's live threads by [`thread_kind`] (a thread that has exited is
/// not counted; the producers' threads live as long as the process).
pub fn cpu_by_thread_kind() -> std::collections::BTreeMap<&'static str, Duration> {
    let mut kinds = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return kinds;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        *kinds.entry(thread_kind(name)).or_default() +=
            Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / 100.0);
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_sorted_by_their_names() {
        assert_eq!(thread_kind("rdk:broker1"), "librdkafka");
        assert_eq!(thread_kind("rdk:main"), "librdkafka");
        assert_eq!(thread_kind("producer pollin"), "delivery reports");
        assert_eq!(thread_kind("tokio-rt-worker"), "runtime");
        assert!(
            cpu_by_thread_kind().contains_key("runtime"),
            "this test's own thread"
        );
    }

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
