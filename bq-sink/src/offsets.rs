//! Which offsets of each partition are safe to commit, and how far a partition has run ahead
//! of its last confirmed commit. A record is "done" once its row is in BigQuery (or skipped as
//! a duplicate) or its dead letter is on the dead-letter topic. The committable offset of a
//! partition is the first offset not yet done, so a commit never passes an unwritten row even
//! when tables flush out of order. Pure: no Kafka here.
//!
//! The *span* of a partition (next offset to read minus last confirmed commit) bounds how many
//! of its records can be written but not committed. The pipeline pauses a partition whose span
//! reaches half the dedup window, so after any crash or rebalance the rows already written
//! beyond the committed offset all lie within `window` records of it: the *suspect* range
//! whose hit_ids the next owner looks up before writing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug, Default)]
struct PartitionState {
    /// Offsets consumed and not yet done, with each record's size in bytes.
    pending: BTreeMap<i64, usize>,
    /// Offsets handed to a flush task (a subset of `pending`).
    writing: BTreeSet<i64>,
    /// One past the highest offset consumed.
    next: Option<i64>,
    /// The last offset the broker confirmed as committed (or where reading started).
    committed: Option<i64>,
    /// The last offset a commit was requested for.
    requested: Option<i64>,
    /// Offsets below this are suspect: possibly written by a previous owner.
    suspect_until: Option<i64>,
    /// Whether consumption of the partition is paused (as last applied to the consumer).
    paused: bool,
    /// When this consumer was assigned the partition.
    assigned_at: Option<std::time::Instant>,
    /// Added to the fence for this assignment: the partition was taken over by a rejoin the
    /// group guard forced, so its previous owner may be alive and not yet told (see
    /// `assign_taken_over`).
    extra_fence: std::time::Duration,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionState>,
    /// Size of the suspect range after an assignment.
    window: i64,
    /// Bytes of the records pending across partitions.
    pending_bytes: usize,
}

impl OffsetTracker {
    pub fn new(window: usize) -> Self {
        Self {
            partitions: HashMap::new(),
            window: i64::try_from(window).unwrap_or(i64::MAX),
            pending_bytes: 0,
        }
    }

    /// Starts tracking a newly assigned partition.
    pub fn assign(&mut self, partition: i32) {
        self.partitions
            .entry(partition)
            .or_default()
            .assigned_at
            .get_or_insert_with(std::time::Instant::now);
    }

    /// Starts tracking a partition given to this consumer after a rejoin the group guard forced
    /// because the partition looked ownerless. Where the broker does not describe the group
    /// (tansu), "ownerless" is judged by committed progress, so the previous owner may be alive
    /// (slow, or draining) and learn of the new assignment only at its next heartbeat; a broker
    /// that does not wait for every member to rejoin (tansu again) hands the partition over
    /// before that. `extra` (the session timeout: within it the previous owner has either
    /// heartbeated and stopped, or lost its session) is added to the fence of this assignment.
    pub fn assign_taken_over(&mut self, partition: i32, extra: std::time::Duration) {
        self.assign(partition);
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.extra_fence = state.extra_fence.max(extra);
        }
    }

    /// How long a lookup of the partition's suspect rows must still wait for `fence` (plus the
    /// assignment's extra fence) after the assignment to have passed (zero when it has, or for
    /// a partition not owned).
    pub fn fence_remaining(
        &self,
        partition: i32,
        fence: std::time::Duration,
    ) -> std::time::Duration {
        self.partitions
            .get(&partition)
            .and_then(|s| Some((s.assigned_at?, s.extra_fence)))
            .map_or(std::time::Duration::ZERO, |(at, extra)| {
                (fence + extra).saturating_sub(at.elapsed())
            })
    }

    /// Forgets a revoked partition: completions that arrive for it later are ignored, since
    /// another consumer owns it now.
    pub fn revoke(&mut self, partition: i32) {
        if let Some(state) = self.partitions.remove(&partition) {
            self.pending_bytes -= state.pending.values().sum::<usize>();
        }
    }

    /// The partitions tracked (owned) now.
    pub fn owned(&self) -> Vec<i32> {
        let mut out: Vec<i32> = self.partitions.keys().copied().collect();
        out.sort_unstable();
        out
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Records that `offset` (of `bytes` bytes) was consumed. Returns whether the record is
    /// suspect (within the window after where this consumer started reading the partition), or
    /// `None` for a partition this consumer does not own: such a record (delivered from the
    /// consumer's queue after a revoke) is the new owner's, and must be dropped, not buffered.
    pub fn consumed(&mut self, partition: i32, offset: i64, bytes: usize) -> Option<bool> {
        let window = self.window;
        let state = self.partitions.get_mut(&partition)?;
        if state.committed.is_none() {
            // Reading resumes at the committed offset: the first record seen marks it.
            state.committed = Some(offset);
            state.requested = Some(offset);
            state.suspect_until = Some(offset.saturating_add(window));
        }
        if let Some(old) = state.pending.insert(offset, bytes) {
            // The same offset delivered twice (a seek back): count it once.
            self.pending_bytes -= old;
        }
        self.pending_bytes += bytes;
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(state.suspect_until.is_some_and(|end| offset < end))
    }

    /// Records that these offsets were handed to a flush task.
    pub fn writing(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.writing.insert(offset);
        }
    }

    /// Records that `offset` is durably handled.
    pub fn done(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            if let Some(bytes) = state.pending.remove(&offset) {
                self.pending_bytes -= bytes;
            }
            state.writing.remove(&offset);
        }
    }

    /// Whether any record of `partition` is being written by a flush task right now.
    pub fn is_writing(&self, partition: i32) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|s| !s.writing.is_empty())
    }

    /// Offsets to commit now: for each partition whose safe point moved past the last request,
    /// the first offset not yet done (Kafka's "next offset to read" convention).
    pub fn to_commit(&mut self) -> Vec<(i32, i64)> {
        self.to_commit_for(|_| true)
    }

    /// `to_commit` for the partitions `which` selects.
    pub fn to_commit_for(&mut self, which: impl Fn(i32) -> bool) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .iter_mut()
            .filter(|(p, _)| which(**p))
            .filter_map(|(p, s)| {
                let safe = s.pending.keys().next().copied().or(s.next)?;
                if s.requested == Some(safe) {
                    return None;
                }
                s.requested = Some(safe);
                Some((*p, safe))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Records the broker's confirmation of a commit.
    pub fn committed(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.committed = Some(state.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// A commit failed: ask again at the next opportunity.
    pub fn commit_failed(&mut self, partition: i32) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.requested = state.committed;
        }
    }

    /// Records read past the last confirmed commit.
    pub fn span(&self, partition: i32) -> i64 {
        self.partitions
            .get(&partition)
            .and_then(|s| Some(s.next? - s.committed?))
            .unwrap_or(0)
    }

    /// Which partitions to pause and to resume now. A partition pauses when it runs
    /// `pause_span` records past its confirmed commit, or when `all` (too much buffered
    /// overall), and resumes once both clear (its span back under half of `pause_span`). Marks
    /// the change as applied; call `set_paused` to undo one the consumer refused.
    pub fn pause_changes(&mut self, all: bool, pause_span: i64) -> (Vec<i32>, Vec<i32>) {
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for (p, s) in &mut self.partitions {
            let span = match (s.next, s.committed) {
                (Some(n), Some(c)) => n - c,
                _ => 0,
            };
            let want = all || span >= pause_span || (s.paused && span > pause_span / 2);
            if want != s.paused {
                s.paused = want;
                if want {
                    pause.push(*p)
                } else {
                    resume.push(*p)
                }
            }
        }
        pause.sort_unstable();
        resume.sort_unstable();
        (pause, resume)
    }

    /// Whether any owned partition is paused now.
    pub fn any_paused(&self) -> bool {
        self.partitions.values().any(|s| s.paused)
    }

    pub fn set_paused(&mut self, partition: i32, paused: bool) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.paused = paused;
        }
    }

    /// Records in flight, across partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.pending.len()).sum()
    }

    /// Bytes of the records in flight, across partitions.
    pub fn in_flight_bytes(&self) -> usize {
        self.pending_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_done_prefix() {
        let mut t = OffsetTracker::new(100);
        t.assign(0);
        for o in 10..15 {
            t.consumed(0, o, 1);
        }
        assert!(
            t.to_commit().is_empty(),
            "nothing done yet, 10 is where reading started"
        );
        // 12 and 13 are written (another table flushed first), 10 and 11 not yet.
        t.done(0, 12);
        t.done(0, 13);
        assert!(
            t.to_commit().is_empty(),
            "must not pass unwritten offset 10"
        );
        t.done(0, 10);
        assert_eq!(t.to_commit(), [(0, 11)]);
        assert!(t.to_commit().is_empty(), "asked once");
        t.done(0, 11);
        t.done(0, 14);
        assert_eq!(t.to_commit(), [(0, 15)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn span_counts_from_the_confirmed_commit() {
        let mut t = OffsetTracker::new(100);
        t.assign(0);
        for o in 0..10 {
            t.consumed(0, o, 1);
            t.done(0, o);
        }
        assert_eq!(t.span(0), 10);
        assert_eq!(t.to_commit(), [(0, 10)]);
        assert_eq!(t.span(0), 10, "requested is not confirmed");
        t.committed(0, 10);
        assert_eq!(t.span(0), 0);
    }

    #[test]
    fn partitions_pause_past_the_span_and_resume_at_half() {
        let mut t = OffsetTracker::new(1000);
        t.assign(0);
        t.assign(1);
        for o in 0..10 {
            t.consumed(0, o, 1);
        }
        assert_eq!(t.pause_changes(false, 10), (vec![0], vec![]));
        assert_eq!(t.pause_changes(false, 10), (vec![], vec![]), "applied once");
        for o in 0..10 {
            t.done(0, o);
        }
        t.committed(0, 4);
        assert_eq!(
            t.pause_changes(false, 10),
            (vec![], vec![]),
            "span 6 is above half"
        );
        t.committed(0, 6);
        assert_eq!(t.pause_changes(false, 10), (vec![], vec![0]));
        assert_eq!(
            t.pause_changes(true, 10),
            (vec![0, 1], vec![]),
            "all pause on memory pressure"
        );
        assert_eq!(t.pause_changes(false, 10), (vec![], vec![0, 1]));
        t.revoke(0);
        t.assign(0);
        assert_eq!(
            t.pause_changes(false, 10),
            (vec![], vec![]),
            "a new assignment starts unpaused"
        );
    }

    #[test]
    fn a_failed_commit_is_asked_again() {
        let mut t = OffsetTracker::new(100);
        t.assign(0);
        t.consumed(0, 0, 1);
        t.done(0, 0);
        assert_eq!(t.to_commit(), [(0, 1)]);
        t.commit_failed(0);
        assert_eq!(t.to_commit(), [(0, 1)]);
    }

    #[test]
    fn records_within_the_window_after_the_start_are_suspect() {
        let mut t = OffsetTracker::new(3);
        t.assign(0);
        t.assign(1);
        assert_eq!(t.consumed(0, 50, 1), Some(true));
        assert_eq!(t.consumed(0, 52, 1), Some(true));
        assert_eq!(t.consumed(0, 53, 1), Some(false));
        assert_eq!(
            t.consumed(1, 7, 1),
            Some(true),
            "each partition has its own window"
        );
    }

    #[test]
    fn partitions_are_independent_and_revoke_forgets() {
        let mut t = OffsetTracker::new(10);
        t.assign(0);
        t.assign(1);
        t.consumed(0, 1, 1);
        t.consumed(1, 7, 1);
        t.writing(1, 7);
        assert!(t.is_writing(1));
        t.done(1, 7);
        assert!(!t.is_writing(1));
        assert_eq!(t.to_commit(), [(1, 8)]);
        t.revoke(1);
        t.done(1, 8);
        assert!(t.to_commit().is_empty());
        assert!(!t.owns(1));
        assert!(t.owns(0));
    }

    /// A record delivered for a partition this consumer does not own (still in librdkafka's
    /// queue from before a revoke) is not adopted: it is the new owner's to write.
    #[test]
    fn records_of_partitions_not_owned_are_dropped() {
        let mut t = OffsetTracker::new(10);
        assert_eq!(t.consumed(3, 7, 100), None);
        assert!(!t.owns(3));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.in_flight_bytes(), 0);
        assert!(t.to_commit().is_empty());
    }

    #[test]
    fn bytes_in_flight_follow_records_and_revokes() {
        let mut t = OffsetTracker::new(10);
        t.assign(0);
        t.assign(1);
        t.consumed(0, 0, 100);
        t.consumed(0, 1, 50);
        t.consumed(1, 0, 7);
        t.consumed(1, 0, 7);
        assert_eq!(t.in_flight_bytes(), 157);
        t.done(0, 0);
        assert_eq!(t.in_flight_bytes(), 57);
        t.revoke(1);
        assert_eq!(t.in_flight_bytes(), 50);
        assert_eq!(t.owned(), [0]);
    }

    #[test]
    fn suspect_lookups_wait_out_the_fence_after_an_assignment() {
        let mut t = OffsetTracker::new(10);
        let fence = std::time::Duration::from_secs(60);
        assert_eq!(
            t.fence_remaining(0, fence),
            std::time::Duration::ZERO,
            "not owned"
        );
        t.assign(0);
        let left = t.fence_remaining(0, fence);
        assert!(left > std::time::Duration::from_secs(59) && left <= fence);
        assert_eq!(
            t.fence_remaining(0, std::time::Duration::ZERO),
            std::time::Duration::ZERO
        );
    }

    #[test]
    fn a_partition_taken_over_by_a_forced_rejoin_waits_the_extra_fence() {
        let mut t = OffsetTracker::new(10);
        let (fence, extra) = (
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(60),
        );
        t.assign(0);
        t.assign_taken_over(1, extra);
        assert!(t.fence_remaining(0, fence) <= fence);
        let left = t.fence_remaining(1, fence);
        assert!(
            left > std::time::Duration::from_secs(61) && left <= fence + extra,
            "{left:?}"
        );
        // The extra fence belongs to that assignment only.
        t.revoke(1);
        t.assign(1);
        assert!(t.fence_remaining(1, fence) <= fence);
    }
}
