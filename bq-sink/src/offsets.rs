//! Which offsets of each partition are safe to commit. A record is "done" once its row is in
//! BigQuery or its dead letter is on the dead-letter topic; the committable offset of a
//! partition is the first offset not yet done, so a commit never passes an unwritten row even
//! when tables flush out of order. Pure: no Kafka here.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
struct PartitionState {
    /// Offsets consumed and not yet done.
    pending: BTreeSet<i64>,
    /// One past the highest offset consumed.
    next: Option<i64>,
    /// The last offset committed (or found committed at assignment).
    committed: Option<i64>,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionState>,
}

impl OffsetTracker {
    /// Starts tracking a newly assigned partition.
    pub fn assign(&mut self, partition: i32) {
        self.partitions.entry(partition).or_default();
    }

    /// Forgets a revoked partition: completions that arrive for it later are ignored, since
    /// another consumer owns it now.
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Records that `offset` was consumed and is now in flight.
    pub fn consumed(&mut self, partition: i32, offset: i64) {
        let state = self.partitions.entry(partition).or_default();
        state.pending.insert(offset);
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Records that `offset` is durably handled.
    pub fn done(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.pending.remove(&offset);
        }
    }

    /// Offsets to commit now: for each partition whose safe point moved, the first offset not
    /// yet done (Kafka's "next offset to read" convention).
    pub fn to_commit(&self) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter_map(|(p, s)| {
                let safe = s.pending.first().copied().or(s.next)?;
                (s.committed != Some(safe)).then_some((*p, safe))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Records a successful commit.
    pub fn committed(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.committed = Some(offset);
        }
    }

    /// Records in flight, across partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.pending.len()).sum()
    }

    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_done_prefix() {
        let mut t = OffsetTracker::default();
        t.assign(0);
        for o in 10..15 {
            t.consumed(0, o);
        }
        assert_eq!(t.to_commit(), [(0, 10)]);
        t.committed(0, 10);
        assert!(t.to_commit().is_empty());
        // 12 and 13 are written (another table flushed first), 10 and 11 not yet.
        t.done(0, 12);
        t.done(0, 13);
        assert!(
            t.to_commit().is_empty(),
            "must not pass unwritten offset 10"
        );
        t.done(0, 10);
        assert_eq!(t.to_commit(), [(0, 11)]);
        t.done(0, 11);
        t.done(0, 14);
        assert_eq!(t.to_commit(), [(0, 15)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_revoke_forgets() {
        let mut t = OffsetTracker::default();
        t.consumed(0, 1);
        t.consumed(1, 7);
        t.done(1, 7);
        assert_eq!(t.to_commit(), [(0, 1), (1, 8)]);
        t.revoke(1);
        t.done(1, 8);
        assert_eq!(t.to_commit(), [(0, 1)]);
        assert!(!t.owns(1));
    }

    #[test]
    fn a_partition_with_nothing_consumed_has_nothing_to_commit() {
        let mut t = OffsetTracker::default();
        t.assign(3);
        assert!(t.to_commit().is_empty());
    }
}
