//! The group guard: decides from the group's actual state whether this member must rejoin, or
//! give up and exit so that it is restarted (crash-only), and whether it should count as ready.
//!
//! Evidence, per partition this member does not own: the group's committed offset and the
//! partition's end (work waiting), and, where the broker answers DescribeGroups (any real
//! Kafka), whether some member of the group owns it. Where it does not (tansu), a partition
//! whose committed offset has not moved for the stall timeout while work waits counts as
//! owned by nobody.
//!
//! Why: a coordinator can leave partitions with nobody. On tansu, a member whose session
//! expired while the broker was paused is never given partitions again however often it
//! rejoins, and a member that joined while a departed member still counted may be given
//! nothing for good; a new process is. So: rejoin first (it helps when the coordinator merely
//! left partitions unassigned), and exit non-zero when ownership does not come back (the
//! orchestrator restarts the process; redelivery and deduplication make that harmless). A
//! member whose assignment was *lost* (its session expired) and that owns nothing a bounded
//! time later exits without waiting for the stall timeout.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::consumer::SinkConsumer;
use crate::metrics::Metrics;

/// What the guard saw of one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub partition: i32,
    /// The group's committed offset, or the partition's start when nothing was committed.
    pub committed: i64,
    /// The partition's end (high watermark).
    pub end: i64,
}

/// One look at the group.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Partitions this member owns.
    pub owned: Vec<i32>,
    /// Every partition of the topic.
    pub partitions: Vec<Seen>,
    /// The partitions some member of the group owns, when the broker describes the group.
    pub owners: Option<HashSet<i32>>,
    /// This member's assignment was lost (session expired) since the last look.
    pub lost: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Rejoin the group to force a new assignment of these partitions.
    Rejoin(Vec<i32>),
    /// Give up: exit so the process is restarted.
    Exit(String),
}

#[derive(Clone, Copy, Debug)]
pub struct GuardSettings {
    /// How long a partition may have work and no owner before the guard acts.
    pub stall: Duration,
    /// Rejoins tried in one episode before exiting.
    pub max_rejoins: u32,
    /// After a lost assignment: how long this member may own nothing while work waits.
    pub regain: Duration,
}

#[derive(Debug)]
pub struct Guard {
    settings: GuardSettings,
    /// Since when each partition has been an orphan candidate (and at which committed offset).
    since: HashMap<i32, (i64, Instant)>,
    rejoins: u32,
    lost_at: Option<Instant>,
}

impl Guard {
    pub fn new(settings: GuardSettings) -> Self {
        Self {
            settings,
            since: HashMap::new(),
            rejoins: 0,
            lost_at: None,
        }
    }

    /// Judges one look at the group. Returns what to do, and whether this member should count
    /// as ready (false while it owns nothing although work waits that nobody owns).
    pub fn observe(&mut self, now: Instant, view: &View) -> (Verdict, bool) {
        let (verdict, ready, _) = self.judge(now, view);
        (verdict, ready)
    }

    /// `observe`, plus the partitions judged owned by nobody (described as such, or with work
    /// waiting and no committed progress for the stall timeout).
    pub fn judge(&mut self, now: Instant, view: &View) -> (Verdict, bool, usize) {
        let owned: HashSet<i32> = view.owned.iter().copied().collect();
        if view.lost {
            self.lost_at.get_or_insert(now);
        }
        if !owned.is_empty() {
            self.lost_at = None;
        }
        let waiting = view.partitions.iter().any(|p| p.committed < p.end);
        let mut kept = HashMap::new();
        let mut stalled = Vec::new();
        for seen in &view.partitions {
            if owned.contains(&seen.partition) || seen.committed >= seen.end {
                continue;
            }
            let candidate_since = match &view.owners {
                // Described: an orphan is a partition no member owns.
                Some(owners) if owners.contains(&seen.partition) => continue,
                Some(_) => self
                    .since
                    .get(&seen.partition)
                    .map_or(now, |(_, since)| *since),
                // Not described: an orphan is one whose commit does not move.
                None => match self.since.get(&seen.partition) {
                    Some((committed, since)) if *committed == seen.committed => *since,
                    _ => now,
                },
            };
            if now.duration_since(candidate_since) >= self.settings.stall {
                stalled.push(seen.partition);
            }
            kept.insert(seen.partition, (seen.committed, candidate_since));
        }
        let orphans = !kept.is_empty();
        let orphaned = stalled.len();
        self.since = kept;
        if !orphans {
            self.rejoins = 0;
        }
        let ready = !owned.is_empty() || stalled.is_empty();
        if let Some(lost_at) = self.lost_at
            && owned.is_empty()
            && waiting
            && now.duration_since(lost_at) >= self.settings.regain
        {
            return (
                Verdict::Exit(format!(
                    "the group expired this member's session and has not given it partitions back within {:?} while records wait",
                    self.settings.regain
                )),
                false,
                orphaned,
            );
        }
        if stalled.is_empty() {
            return (Verdict::Fine, ready, orphaned);
        }
        if self.rejoins >= self.settings.max_rejoins {
            return (
                Verdict::Exit(format!(
                    "partitions {stalled:?} have records waiting and no owner, and {} rejoins did not change that",
                    self.rejoins
                )),
                false,
                orphaned,
            );
        }
        self.rejoins += 1;
        // Count afresh after the rejoin.
        self.since.clear();
        (Verdict::Rejoin(stalled), ready, orphaned)
    }
}

/// Looks at the group every quarter of the stall timeout (at least every 2 s) and acts on the
/// guard's verdict: rejoins, sets readiness, or returns the reason to exit. Runs beside the
/// pipeline until `cancel`; librdkafka's calls are thread-safe, and a rejoin's rebalance is
/// served by the pipeline's poll as any other.
///
/// The looks (metadata, committed offsets, watermarks, DescribeGroups) go through `observer`,
/// a client of the same group that never joins it: a broker that answers DescribeGroups by
/// closing the connection (tansu) must not cut the consumer's own connections, which carry its
/// heartbeats. Only the consumer's assignment is read from the consumer itself.
#[allow(clippy::too_many_arguments)]
pub async fn watch(
    consumer: Arc<SinkConsumer>,
    observer: Arc<rdkafka::consumer::BaseConsumer>,
    topic: String,
    group: String,
    settings: GuardSettings,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    cancel: CancellationToken,
) -> Option<String> {
    let mut guard = Guard::new(settings);
    let every = (settings.stall / 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut describe_works = true;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return None,
            _ = tick.tick() => {}
        }
        let lost = consumer
            .context()
            .assignment_lost
            .swap(false, Ordering::Relaxed);
        let (c, o, t, g) = (
            consumer.clone(),
            observer.clone(),
            topic.clone(),
            group.clone(),
        );
        let looked =
            tokio::task::spawn_blocking(move || look(&c, &o, &t, &g, describe_works)).await;
        let Ok(Some((mut view, described))) = looked else {
            // Broker unreachable: nothing to judge (the lost flag is kept for the next look).
            if lost {
                consumer
                    .context()
                    .assignment_lost
                    .store(true, Ordering::Relaxed);
            }
            continue;
        };
        if describe_works && !described {
            tracing::info!(
                "the broker does not describe consumer groups; judging partition ownership by committed progress"
            );
        }
        describe_works = described;
        view.lost = lost;
        let (verdict, is_ready, orphaned) = guard.judge(Instant::now(), &view);
        metrics.orphaned_partitions.set(orphaned as i64);
        ready.store(is_ready, Ordering::Relaxed);
        match verdict {
            Verdict::Fine => {}
            Verdict::Rejoin(stalled) => {
                tracing::warn!(
                    ?stalled,
                    "partitions with records waiting have no owner: rejoining the group"
                );
                metrics.group_rejoins.inc();
                // The partitions may still have a live owner that has not heard of the new
                // assignment yet (judged by committed progress, it may only be slow or
                // draining): the assignment this rejoin brings waits longer before lookups.
                consumer.context().takeover.store(true, Ordering::Relaxed);
                let (c, t) = (consumer.clone(), topic.clone());
                let rejoined = tokio::task::spawn_blocking(move || {
                    c.unsubscribe();
                    c.subscribe(&[&t])
                })
                .await;
                if !matches!(rejoined, Ok(Ok(()))) {
                    tracing::error!(?rejoined, "rejoining the group failed");
                }
            }
            Verdict::Exit(reason) => return Some(reason),
        }
    }
}

/// One look: this member's assignment, every partition's committed offset and end, and (when
/// `describe`) which partitions the group's members own. `None` when the broker does not
/// answer; the flag says whether the group was described.
fn look(
    consumer: &SinkConsumer,
    observer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    group: &str,
    describe: bool,
) -> Option<(View, bool)> {
    const WAIT: Duration = Duration::from_secs(5);
    let owned: Vec<i32> = consumer
        .assignment()
        .ok()?
        .elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect();
    let consumer = observer;
    let metadata = consumer.fetch_metadata(Some(topic), WAIT).ok()?;
    let mut list = TopicPartitionList::new();
    for p in metadata.topics().first()?.partitions() {
        list.add_partition(topic, p.id());
    }
    let committed = consumer.committed_offsets(list, WAIT).ok()?;
    let mut partitions = Vec::new();
    for element in committed.elements() {
        let (start, end) = consumer
            .fetch_watermarks(topic, element.partition(), WAIT)
            .ok()?;
        partitions.push(Seen {
            partition: element.partition(),
            committed: match element.offset() {
                Offset::Offset(o) => o,
                _ => start,
            },
            end,
        });
    }
    let owners = if describe {
        describe_owners(consumer, topic, group)
    } else {
        None
    };
    let described = owners.is_some();
    Some((
        View {
            owned,
            partitions,
            owners,
            lost: false,
        },
        described,
    ))
}

/// The partitions of `topic` the group's members own, from DescribeGroups. `None` when the
/// broker does not answer it (tansu closes the connection).
fn describe_owners(
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    group: &str,
) -> Option<HashSet<i32>> {
    let list = consumer
        .fetch_group_list(Some(group), Duration::from_secs(3))
        .ok()?;
    let info = list.groups().iter().find(|g| g.name() == group)?;
    if info.protocol_type() != "consumer" && !info.protocol_type().is_empty() {
        return None;
    }
    let mut owned = HashSet::new();
    for member in info.members() {
        if let Some(bytes) = member.assignment() {
            owned.extend(assignment_partitions(bytes, topic)?);
        }
    }
    Some(owned)
}

/// Parses a consumer-protocol MemberAssignment (version, [topic, [partition]], user data) and
/// returns the partitions of `topic`.
pub fn assignment_partitions(bytes: &[u8], topic: &str) -> Option<Vec<i32>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    let mut b = bytes;
    if b.is_empty() {
        return Some(Vec::new());
    }
    let _version = take(&mut b, 2)?;
    let topics = i32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?);
    let mut out = Vec::new();
    for _ in 0..topics.max(0) {
        let len = i16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?);
        let name = take(&mut b, usize::try_from(len).ok()?)?;
        let count = i32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?);
        for _ in 0..count.max(0) {
            let p = i32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?);
            if name == topic.as_bytes() {
                out.push(p);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: GuardSettings = GuardSettings {
        stall: Duration::from_secs(10),
        max_rejoins: 2,
        regain: Duration::from_secs(15),
    };

    fn seen(partition: i32, committed: i64, end: i64) -> Seen {
        Seen {
            partition,
            committed,
            end,
        }
    }

    fn view(owned: &[i32], partitions: &[Seen]) -> View {
        View {
            owned: owned.to_vec(),
            partitions: partitions.to_vec(),
            owners: None,
            lost: false,
        }
    }

    #[test]
    fn orphans_without_progress_are_rejoined_then_the_member_exits() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut g = Guard::new(SETTINGS);
        let stuck = view(&[], &[seen(0, 5, 9), seen(1, 3, 3)]);
        assert_eq!(g.observe(at(0), &stuck), (Verdict::Fine, true));
        assert_eq!(g.observe(at(9), &stuck), (Verdict::Fine, true));
        assert_eq!(g.observe(at(10), &stuck), (Verdict::Rejoin(vec![0]), false));
        assert_eq!(
            g.observe(at(11), &stuck).0,
            Verdict::Fine,
            "counting afresh"
        );
        assert_eq!(g.observe(at(21), &stuck).0, Verdict::Rejoin(vec![0]));
        assert_eq!(g.observe(at(22), &stuck).0, Verdict::Fine);
        assert!(matches!(
            g.observe(at(32), &stuck),
            (Verdict::Exit(_), false)
        ));
    }

    #[test]
    fn progress_ownership_or_no_work_is_never_a_stall() {
        let t0 = Instant::now();
        let mut g = Guard::new(SETTINGS);
        for s in 0..60 {
            let now = t0 + Duration::from_secs(s);
            // 0 advances, 1 has nothing waiting, 2 is ours.
            let v = view(
                &[2],
                &[
                    seen(0, s as i64, s as i64 + 100),
                    seen(1, 7, 7),
                    seen(2, 0, 1000),
                ],
            );
            assert_eq!(g.observe(now, &v), (Verdict::Fine, true), "at {s} s");
        }
    }

    #[test]
    fn a_described_group_owning_the_partition_is_never_a_stall_even_without_progress() {
        let t0 = Instant::now();
        let mut g = Guard::new(SETTINGS);
        let mut v = view(&[], &[seen(0, 5, 9)]);
        v.owners = Some(HashSet::from([0]));
        for s in 0..60 {
            assert_eq!(
                g.observe(t0 + Duration::from_secs(s), &v),
                (Verdict::Fine, true),
                "another member owns it (BigQuery may be down for it)"
            );
        }
        // Nobody owns it: judged from the first look, even while its commit moves.
        v.owners = Some(HashSet::new());
        assert_eq!(
            g.observe(t0 + Duration::from_secs(100), &v).0,
            Verdict::Fine
        );
        v.partitions = vec![seen(0, 6, 9)];
        assert_eq!(
            g.observe(t0 + Duration::from_secs(110), &v).0,
            Verdict::Rejoin(vec![0])
        );
    }

    /// The broker pause: the session expired, the member rejoined and owns nothing.
    #[test]
    fn a_lost_assignment_not_regained_in_time_exits_without_waiting_for_the_stall() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut g = Guard::new(SETTINGS);
        let mut v = view(&[0, 1], &[seen(0, 5, 9), seen(1, 0, 0)]);
        assert_eq!(g.observe(at(0), &v).0, Verdict::Fine);
        v.owned.clear();
        v.lost = true;
        assert_eq!(g.observe(at(1), &v).0, Verdict::Fine);
        v.lost = false;
        // Work waits on 0 with a moving commit (so no stall), yet nobody gave it back to us.
        v.partitions = vec![seen(0, 6, 9), seen(1, 0, 0)];
        assert_eq!(g.observe(at(15), &v).0, Verdict::Fine);
        v.partitions = vec![seen(0, 7, 9), seen(1, 0, 0)];
        assert!(matches!(g.observe(at(16), &v), (Verdict::Exit(_), false)));
        // Regained in time: no exit.
        let mut g = Guard::new(SETTINGS);
        let mut v = view(&[], &[seen(0, 5, 9)]);
        v.lost = true;
        g.observe(at(0), &v);
        v.lost = false;
        v.owned = vec![0];
        assert_eq!(g.observe(at(20), &v).0, Verdict::Fine);
    }

    #[test]
    fn member_assignments_are_parsed() {
        // version 0, 1 topic "webhooks" with partitions 0 and 3, empty user data.
        let mut b = vec![0, 0, 0, 0, 0, 1, 0, 8];
        b.extend_from_slice(b"webhooks");
        b.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(assignment_partitions(&b, "webhooks"), Some(vec![0, 3]));
        assert_eq!(assignment_partitions(&b, "other"), Some(vec![]));
        assert_eq!(assignment_partitions(&[], "webhooks"), Some(vec![]));
        assert_eq!(assignment_partitions(&[0, 0, 0], "webhooks"), None);
    }
}
