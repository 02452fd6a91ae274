//! hit_id deduplication that needs nothing from the broker. Three layers, cheapest first:
//! repeats inside one batch, hit_ids this process wrote recently (a sender's retry with the
//! same Idempotency-Key arrives at a new offset of the same partition), and, for records in
//! the suspect range after an assignment, a lookup in the table itself (rows written by a
//! previous owner that crashed or was rebalanced away before committing). Pure except for the
//! lookup, which the caller performs.

use std::collections::{HashSet, VecDeque};

use uuid::Uuid;

/// The hit_ids written most recently by this process, bounded in memory (16 bytes per hit
/// plus set overhead).
#[derive(Debug)]
pub struct RecentHits {
    set: HashSet<u128>,
    order: VecDeque<u128>,
    capacity: usize,
}

impl RecentHits {
    pub fn new(capacity: usize) -> Self {
        Self {
            set: HashSet::with_capacity(capacity.min(1 << 20)),
            order: VecDeque::with_capacity(capacity.min(1 << 20)),
            capacity,
        }
    }

    pub fn contains(&self, hit_id: &Uuid) -> bool {
        self.set.contains(&hit_id.as_u128())
    }

    /// Remembers written hit_ids, forgetting the oldest beyond capacity.
    pub fn insert(&mut self, hit_ids: impl IntoIterator<Item = Uuid>) {
        if self.capacity == 0 {
            return;
        }
        for k in hit_ids.into_iter().map(|u| u.as_u128()) {
            if self.set.insert(k) {
                self.order.push_back(k);
                if self.order.len() > self.capacity
                    && let Some(old) = self.order.pop_front()
                {
                    self.set.remove(&old);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Splits indexes of a batch into those to write and those that repeat an earlier hit_id of the
/// same batch or a recently written one.
///
/// Each hit_id comes with whether it was put back on purpose (replay-dlq, the audit's
/// repair, parking): those are not skipped for being in the memory, since they may have been
/// removed from the table since; the look-up before their write decides.
pub fn first_occurrences(
    hit_ids: impl IntoIterator<Item = (Uuid, bool)>,
    recent: &RecentHits,
) -> (Vec<usize>, Vec<usize>) {
    let mut seen = HashSet::new();
    let (mut keep, mut skip) = (Vec::new(), Vec::new());
    for (i, (id, put_back)) in hit_ids.into_iter().enumerate() {
        if (!put_back && recent.contains(&id)) || !seen.insert(id) {
            skip.push(i);
        } else {
            keep.push(i);
        }
    }
    (keep, skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Uuid = Uuid::from_u128(0x83cc2a6a_4829_4410_bab4_95b680c5b8d7);
    const B: Uuid = Uuid::from_u128(0x01a21e81_2a0c_7193_9dd5_22e7392d1a2e);
    const C: Uuid = Uuid::from_u128(0x01a21e82_8389_71ca_8083_d7d7f580ed7c);

    #[test]
    fn recent_hits_are_bounded() {
        let mut r = RecentHits::new(2);
        r.insert([A, B]);
        assert!(r.contains(&A) && r.contains(&B));
        r.insert([C]);
        assert!(!r.contains(&A), "oldest forgotten");
        assert!(r.contains(&B) && r.contains(&C));
        assert_eq!(r.len(), 2);
        r.insert([C]);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn repeats_in_a_batch_and_recent_writes_are_skipped() {
        let mut r = RecentHits::new(10);
        r.insert([C]);
        let plain = |ids: [Uuid; 5]| ids.map(|id| (id, false));
        let (keep, skip) = first_occurrences(plain([A, B, A, C, B]), &r);
        assert_eq!(keep, [0, 1]);
        assert_eq!(skip, [2, 3, 4]);
    }

    #[test]
    fn a_hit_put_back_on_purpose_is_not_skipped_for_being_remembered() {
        // The audit's repair of a row deleted from the table: the look-up decides, not memory.
        let mut r = RecentHits::new(10);
        r.insert([C]);
        let (keep, skip) = first_occurrences([(C, true), (C, true), (A, false)], &r);
        assert_eq!(keep, [0, 2]);
        assert_eq!(skip, [1]);
    }
}
