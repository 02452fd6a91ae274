//! `bq-sink replay-dlq`: puts dead letters back on the main topic once their cause is fixed
//! (a stream added to the catalogue, a table's schema repaired). Reads the dead-letter topic
//! from its start up to where it ended when the command began, filters, and republishes each
//! match with its original key. Replayed envelopes are flagged, so the sink looks their hit_id
//! up before writing and a second replay cannot duplicate a row.

use std::collections::HashMap;
use std::time::Duration;

use hookpipe_proto::{DeadLetter, Envelope, Message as _};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use uuid::Uuid;

/// Which dead letters to replay. Times are compared with the hit's `received_at` (for a record
/// that was never a decodable envelope, with when it was dead-lettered).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ReplayArgs {
    /// Only dead letters of this stream.
    #[arg(long)]
    pub stream: Option<Uuid>,
    /// Only dead letters with this reason (undecodable, unknown_stream, invalid_payload,
    /// rejected_by_bigquery, schema_mismatch).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only hits received at or after this instant (RFC 3339, e.g. 2026-11-27T00:00:00Z).
    #[arg(long, value_parser = parse_instant)]
    pub since: Option<i64>,
    /// Only hits received before this instant (RFC 3339).
    #[arg(long, value_parser = parse_instant)]
    pub until: Option<i64>,
    /// Count what would be replayed without publishing anything.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_instant(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("`{s}` is not an RFC 3339 instant: {e}"))
}

impl ReplayArgs {
    /// Whether a dead letter passes the filters.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let when = if letter.received_at_ms != 0 {
            letter.received_at_ms
        } else {
            letter.dead_lettered_at_ms
        };
        self.stream
            .is_none_or(|s| letter.stream_id == s.to_string())
            && self.reason.as_deref().is_none_or(|r| letter.reason == r)
            && self.since.is_none_or(|t| when >= t)
            && self.until.is_none_or(|t| when < t)
    }
}

/// The record value to put back: the original envelope flagged as replayed, or the original
/// bytes unchanged when they never were an envelope.
pub fn replay_value(letter: &DeadLetter) -> Vec<u8> {
    match Envelope::decode(letter.original.as_slice()) {
        Ok(mut envelope) => {
            envelope.replayed = true;
            envelope.encode_to_vec()
        }
        Err(_) => letter.original.clone(),
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub read: u64,
    pub matched: u64,
    pub replayed: u64,
}

/// Replays from `dlq_topic` to `topic`.
pub async fn run(
    base: &ClientConfig,
    dlq_topic: &str,
    topic: &str,
    args: &ReplayArgs,
) -> Result<Summary, String> {
    let mut consumer_config = base.clone();
    consumer_config
        .set("group.id", format!("bq-sink-replay-{}", Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: StreamConsumer = consumer_config.create().map_err(|e| e.to_string())?;
    let mut producer_config = base.clone();
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all");
    let producer: FutureProducer = producer_config.create().map_err(|e| e.to_string())?;

    // Where each partition ends now: records dead-lettered later are not this run's business.
    let metadata = consumer
        .fetch_metadata(Some(dlq_topic), Duration::from_secs(10))
        .map_err(|e| format!("reading {dlq_topic} metadata: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(dlq_topic, p, Duration::from_secs(10))
            .map_err(|e| format!("reading {dlq_topic}/{p} watermarks: {e}"))?;
        if high > low {
            ends.insert(p, high);
            assignment
                .add_partition_offset(dlq_topic, p, Offset::Offset(low))
                .map_err(|e| e.to_string())?;
        }
    }
    let mut summary = Summary::default();
    if ends.is_empty() {
        return Ok(summary);
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    while !ends.is_empty() {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .map_err(|_| "no progress reading the dead-letter topic for 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        let (p, offset) = (message.partition(), message.offset());
        let Some(&end) = ends.get(&p) else { continue };
        if offset >= end {
            continue;
        }
        if offset + 1 >= end {
            ends.remove(&p);
        }
        summary.read += 1;
        let Ok(letter) = DeadLetter::decode(message.payload().unwrap_or(&[])) else {
            tracing::warn!(partition = p, offset, "not a dead letter, skipped");
            continue;
        };
        if !args.matches(&letter) {
            continue;
        }
        summary.matched += 1;
        if args.dry_run {
            continue;
        }
        let value = replay_value(&letter);
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(&value);
        if !letter.original_key.is_empty() {
            record = record.key(&letter.original_key);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| format!("publishing to {topic}: {e}"))?;
        summary.replayed += 1;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(stream: &str, reason: &str, received_at_ms: i64) -> DeadLetter {
        DeadLetter {
            original: Envelope {
                hit_id: "83cc2a6a-4829-4410-bab4-95b680c5b8d7".into(),
                stream_id: stream.into(),
                received_at_ms,
                payload: b"a=1".to_vec().into(),
                ..Default::default()
            }
            .encode_to_vec(),
            reason: reason.into(),
            stream_id: stream.into(),
            received_at_ms,
            dead_lettered_at_ms: received_at_ms + 1000,
            ..Default::default()
        }
    }

    const S: &str = "522ed95e-9f07-45f6-a0b7-28bf2d0315e5";

    #[test]
    fn filters_by_stream_reason_and_time() {
        let l = letter(S, "unknown_stream", 1_000_000);
        assert!(ReplayArgs::default().matches(&l));
        let by_stream = ReplayArgs {
            stream: Some(S.parse().unwrap()),
            ..Default::default()
        };
        assert!(by_stream.matches(&l));
        let other = ReplayArgs {
            stream: Some(Uuid::nil()),
            ..Default::default()
        };
        assert!(!other.matches(&l));
        let reason = ReplayArgs {
            reason: Some("schema_mismatch".into()),
            ..Default::default()
        };
        assert!(!reason.matches(&l));
        let window = ReplayArgs {
            since: Some(1_000_000),
            until: Some(1_000_001),
            ..Default::default()
        };
        assert!(window.matches(&l));
        let later = ReplayArgs {
            since: Some(1_000_001),
            ..Default::default()
        };
        assert!(!later.matches(&l));
        assert_eq!(parse_instant("1970-01-01T00:16:40Z"), Ok(1_000_000));
    }

    #[test]
    fn replayed_envelopes_are_flagged_and_otherwise_unchanged() {
        let l = letter(S, "unknown_stream", 5);
        let back = Envelope::decode(replay_value(&l).as_slice()).unwrap();
        let mut original = Envelope::decode(l.original.as_slice()).unwrap();
        assert!(back.replayed);
        original.replayed = true;
        assert_eq!(back, original);
        let garbage = DeadLetter {
            original: vec![0xff, 0xff],
            ..Default::default()
        };
        assert_eq!(replay_value(&garbage), vec![0xff, 0xff]);
    }
}
