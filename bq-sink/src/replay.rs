//! `bq-sink replay-dlq`: puts dead letters back on the main topic once their cause is fixed
//! (a stream added to the catalogue, a table's schema repaired). Reads the dead-letter topic
//! from the replay's cursor (a named consumer group, so a second run does not replay the same
//! letters again) up to where the topic ended when the command began, filters, republishes
//! each match with its original key (pipelined, every acknowledgement awaited), and then moves
//! the cursor. Replayed envelopes are flagged, so the sink looks their hit_id up before writing
//! and replaying twice can never write a row twice.

use std::collections::HashMap;
use std::time::Duration;

use hookpipe_proto::{DeadLetter, Envelope, Message as _};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use uuid::Uuid;

/// Reasons whose records can never become rows: replaying them would only dead-letter them
/// again.
pub const CANNOT_COME_BACK: [&str; 1] = ["undecodable"];

/// Which dead letters to replay. Times are compared with the hit's `received_at` (for a record
/// that was never a decodable envelope, with when it was dead-lettered).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ReplayArgs {
    /// Only dead letters of this stream.
    #[arg(long)]
    pub stream: Option<Uuid>,
    /// Only dead letters with this reason (unknown_stream, invalid_payload,
    /// rejected_by_bigquery, schema_mismatch; `undecodable` records can never be rows and are
    /// refused).
    #[arg(long, value_parser = parse_reason)]
    pub reason: Option<String>,
    /// Only hits received at or after this instant (RFC 3339, e.g. 2026-11-27T00:00:00Z).
    #[arg(long, value_parser = parse_instant)]
    pub since: Option<i64>,
    /// Only hits received before this instant (RFC 3339).
    #[arg(long, value_parser = parse_instant)]
    pub until: Option<i64>,
    /// Count what would be replayed without publishing anything (the cursor does not move).
    #[arg(long)]
    pub dry_run: bool,
    /// The replay's cursor: a consumer group on the dead-letter topic. Defaults to
    /// `<HOOKPIPE_GROUP_ID>.replay`, plus the reason and stream filters, so each kind of replay
    /// has its own cursor.
    #[arg(long = "cursor")]
    pub cursor: Option<String>,
    /// Read the dead-letter topic from its start, not from the cursor (replaying again is
    /// harmless: the sink looks replayed rows up before writing).
    #[arg(long)]
    pub from_start: bool,
}

pub fn parse_instant(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("`{s}` is not an RFC 3339 instant: {e}"))
}

fn parse_reason(s: &str) -> Result<String, String> {
    if CANNOT_COME_BACK.contains(&s) {
        return Err(format!(
            "`{s}` records can never become rows (not an envelope, or a receipt day outside BigQuery's DATE range); replaying them would dead-letter them again"
        ));
    }
    Ok(s.to_owned())
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

    /// The cursor's consumer group.
    pub fn cursor_group(&self, group: &str) -> String {
        if let Some(cursor) = &self.cursor {
            return cursor.clone();
        }
        let mut name = format!("{group}.replay");
        if let Some(reason) = &self.reason {
            name.push('.');
            name.push_str(reason);
        }
        if let Some(stream) = &self.stream {
            name.push('.');
            name.push_str(&stream.to_string());
        }
        name
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
    pub cursor: String,
    pub read: u64,
    pub matched: u64,
    pub replayed: u64,
    /// Letters that can never come back (undecodable) or were stored truncated.
    pub skipped: u64,
}

impl Summary {
    pub fn describe(&self, dlq_topic: &str, topic: &str, dry_run: bool) -> String {
        format!(
            "read {} dead letters from {dlq_topic} (cursor {}), {} matched, {} replayed to {topic}, {} skipped (cannot come back){}",
            self.read,
            self.cursor,
            self.matched,
            self.replayed,
            self.skipped,
            if dry_run { " (dry run)" } else { "" }
        )
    }
}

/// Replays from `dlq_topic` to `topic`.
pub async fn run(
    base: &ClientConfig,
    dlq_topic: &str,
    topic: &str,
    group: &str,
    args: &ReplayArgs,
) -> Result<Summary, String> {
    let cursor = args.cursor_group(group);
    let mut consumer_config = base.clone();
    consumer_config
        .set("group.id", &cursor)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    let consumer: StreamConsumer = consumer_config.create().map_err(|e| e.to_string())?;
    let mut producer_config = base.clone();
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", "16777216");
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
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(dlq_topic, *p);
    }
    let committed = if args.from_start {
        TopicPartitionList::new()
    } else {
        consumer
            .committed_offsets(wanted, Duration::from_secs(10))
            .map_err(|e| format!("reading the cursor {cursor}: {e}"))?
    };
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(dlq_topic, p, Duration::from_secs(10))
            .map_err(|e| format!("reading {dlq_topic}/{p} watermarks: {e}"))?;
        let from = committed
            .find_partition(dlq_topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(low)
            .max(low);
        if high > from {
            ends.insert(p, high);
            assignment
                .add_partition_offset(dlq_topic, p, Offset::Offset(from))
                .map_err(|e| e.to_string())?;
        }
    }
    let mut summary = Summary {
        cursor: cursor.clone(),
        ..Summary::default()
    };
    if ends.is_empty() {
        return Ok(summary);
    }
    let finished: HashMap<i32, i64> = ends.clone();
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut sends = Vec::new();
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
        if CANNOT_COME_BACK.contains(&letter.reason.as_str()) || letter.truncated {
            summary.skipped += 1;
            continue;
        }
        summary.matched += 1;
        if args.dry_run {
            continue;
        }
        let value = replay_value(&letter);
        let key = letter.original_key;
        let producer = producer.clone();
        let topic = topic.to_owned();
        sends.push(async move {
            let mut record = FutureRecord::<[u8], [u8]>::to(&topic).payload(&value);
            if !key.is_empty() {
                record = record.key(&key);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map(|_| ())
                .map_err(|(e, _)| format!("publishing to {topic}: {e}"))
        });
    }
    for result in futures_util::future::join_all(sends).await {
        result?;
        summary.replayed += 1;
    }
    if !args.dry_run {
        // Every replayed letter is acknowledged on the main topic: move the cursor past them.
        let mut tpl = TopicPartitionList::new();
        for (p, end) in finished {
            tpl.add_partition_offset(dlq_topic, p, Offset::Offset(end))
                .map_err(|e| e.to_string())?;
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| format!("moving the cursor {cursor}: {e}"))?;
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
    fn undecodable_letters_are_refused_and_cursors_follow_the_filters() {
        assert!(parse_reason("undecodable").is_err());
        assert_eq!(parse_reason("unknown_stream"), Ok("unknown_stream".into()));
        let args = ReplayArgs {
            reason: Some("unknown_stream".into()),
            ..Default::default()
        };
        assert_eq!(
            args.cursor_group("bq-sink"),
            "bq-sink.replay.unknown_stream"
        );
        assert_eq!(ReplayArgs::default().cursor_group("g"), "g.replay");
        let named = ReplayArgs {
            cursor: Some("mine".into()),
            ..args
        };
        assert_eq!(named.cursor_group("g"), "mine");
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
