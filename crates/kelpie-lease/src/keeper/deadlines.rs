//! One deadline per held lease, earliest first: an indexed binary min-heap.
//!
//! The keeper reschedules a lease on every renewal, twice (its next renewal and its belief's
//! end). In a sorted set that was a removal and an insertion each, about 200 instructions
//! apiece with the tree's node shifting and rebalancing, 3% of a simulated swarm. Here a
//! lease's entry moves in place: an update is one sift, O(log n), and usually a few levels
//! since a renewal moves its lease from the front (it was due) towards the back.
//!
//! Leases are named by their index in the keeper's held map (dense, `0..len`), and each index
//! has at most one entry, so the heap keeps each index's place and can update or remove it
//! without a search. Entries are ordered by (deadline, index), so the heap's shape, and the
//! order [`Deadlines::for_each_due`] visits them in, follow from the calls alone.

/// Deadlines of indices `0..`, at most one each.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    /// (deadline, index), a min-heap: each entry is no later than its children at `2i + 1`
    /// and `2i + 2`.
    heap: Vec<Entry>,
    /// `place[index]`: where `index`'s entry is in `heap`, or [`ABSENT`].
    place: Vec<usize>,
}

/// An index without an entry.
const ABSENT: usize = usize::MAX;

/// (deadline, index) packed in one integer that orders as the pair does: the deadline in the
/// high half. A comparison in the sifts is one instruction pair, not two branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry(u128);

impl Entry {
    #[inline]
    fn new(deadline_ms: u64, index: usize) -> Self {
        Self((u128::from(deadline_ms) << 64) | index as u128)
    }

    #[inline]
    fn deadline_ms(self) -> u64 {
        (self.0 >> 64) as u64
    }

    #[inline]
    fn index(self) -> usize {
        self.0 as u64 as usize
    }
}

impl Deadlines {
    /// Sets `index`'s deadline, adding its entry if it has none.
    pub(super) fn set(&mut self, index: usize, deadline_ms: u64) {
        if index >= self.place.len() {
            self.place.resize(index + 1, ABSENT);
        }
        match self.place[index] {
            ABSENT => {
                self.heap.push(Entry::new(deadline_ms, index));
                self.place[index] = self.heap.len() - 1;
                self.sift_up(self.heap.len() - 1);
            }
            at => {
                let later = deadline_ms > self.heap[at].deadline_ms();
                self.heap[at] = Entry::new(deadline_ms, index);
                self.restore(at, later);
            }
        }
    }

    /// Moves the entry at `at`, whose order just changed, to its place: down if it became
    /// `later`, else up.
    fn restore(&mut self, at: usize, later: bool) {
        if later {
            self.sift_down(at);
        } else {
            self.sift_up(at);
        }
    }

    /// Removes `index`'s entry; false if it had none.
    pub(super) fn remove(&mut self, index: usize) -> bool {
        let Some(&at) = self.place.get(index).filter(|&&at| at != ABSENT) else {
            return false;
        };
        self.place[index] = ABSENT;
        let last = self.heap.pop().expect("an entry is in the heap");
        if at < self.heap.len() {
            let later = at == 0 || last > self.heap[(at - 1) / 2];
            self.put(at, last);
            self.restore(at, later);
        }
        true
    }

    /// Renames `from`'s entry to `to`, which has none (the keeper moves its last lease into a
    /// freed index). Its deadline stays; its place moves only if the tie order changed.
    pub(super) fn rename(&mut self, from: usize, to: usize) {
        let at = self.place[from];
        assert!(
            at != ABSENT && self.place.get(to).is_none_or(|&to_at| to_at == ABSENT),
            "rename {from} -> {to}: the source has no entry or the target has one"
        );
        self.place[from] = ABSENT;
        if to >= self.place.len() {
            self.place.resize(to + 1, ABSENT);
        }
        let later = to > from;
        self.place[to] = at;
        self.heap[at] = Entry::new(self.heap[at].deadline_ms(), to);
        self.restore(at, later);
    }

    /// The earliest deadline.
    pub(super) fn first_ms(&self) -> Option<u64> {
        self.heap.first().map(|entry| entry.deadline_ms())
    }

    /// Calls `f` with every index whose deadline is at or before `now_ms`, in no particular
    /// order. Visits only those entries and their children: a subtree whose root is later has
    /// nothing due.
    pub(super) fn for_each_due(&self, now_ms: u64, mut f: impl FnMut(usize)) {
        self.visit_due(0, now_ms, &mut f);
    }

    fn visit_due(&self, at: usize, now_ms: u64, f: &mut impl FnMut(usize)) {
        // Recursion as deep as the heap is high: about log2 of the leases held.
        if let Some(&entry) = self.heap.get(at) {
            if entry.deadline_ms() <= now_ms {
                f(entry.index());
                self.visit_due(2 * at + 1, now_ms, f);
                self.visit_due(2 * at + 2, now_ms, f);
            }
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Every (deadline, index), sorted: for comparing with a scan.
    #[cfg(test)]
    pub(super) fn sorted(&self) -> Vec<(u64, usize)> {
        self.assert_heap();
        let mut entries: Vec<(u64, usize)> = (self.heap.iter())
            .map(|entry| (entry.deadline_ms(), entry.index()))
            .collect();
        entries.sort_unstable();
        entries
    }

    /// The heap order holds and `place` names every entry's place, and nothing else.
    #[cfg(test)]
    fn assert_heap(&self) {
        for (at, entry) in self.heap.iter().enumerate() {
            let index = entry.index();
            assert_eq!(self.place[index], at, "index {index}'s place");
            if at > 0 {
                assert!(
                    self.heap[(at - 1) / 2] < self.heap[at],
                    "heap order at {at}"
                );
            }
        }
        let placed = self.place.iter().filter(|&&at| at != ABSENT).count();
        assert_eq!(placed, self.heap.len(), "a place for every entry, only");
    }

    /// Moves the entry at `at` up while it is earlier than its parent.
    fn sift_up(&mut self, at: usize) {
        self.rise(self.heap[at], at, 0);
    }

    /// Puts `entry` into the hole at `hole`, or higher up, but not above `top`: the parents
    /// later than it move down into the hole as it rises.
    fn rise(&mut self, entry: Entry, mut hole: usize, top: usize) {
        while hole > top {
            let parent = (hole - 1) / 2;
            let above = self.heap[parent];
            if above <= entry {
                break;
            }
            self.put(hole, above);
            hole = parent;
        }
        self.put(hole, entry);
    }

    /// Moves the entry at `at` down to where it belongs below. The hole goes down to a leaf
    /// through the earlier child at each level (one comparison a level), then the entry rises
    /// from there: a renewed lease, which leaves the top for about the latest deadline, rarely
    /// rises at all (Floyd's bottom-up sift).
    fn sift_down(&mut self, at: usize) {
        let entry = self.heap[at];
        let mut hole = at;
        loop {
            let left = 2 * hole + 1;
            let child = match (self.heap.get(left), self.heap.get(left + 1)) {
                (Some(l), Some(r)) if r < l => left + 1,
                (Some(_), _) => left,
                (None, _) => break,
            };
            self.put(hole, self.heap[child]);
            hole = child;
        }
        self.rise(entry, hole, at);
    }

    /// Writes `entry` at `at`, and notes its place.
    fn put(&mut self, at: usize, entry: Entry) {
        self.heap[at] = entry;
        self.place[entry.index()] = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    /// Random sets, removals and renames agree with a map at every step: the same entries,
    /// the same earliest deadline, the same indices due at random instants.
    #[test]
    fn agrees_with_a_sorted_map() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut deadlines = Deadlines::default();
        let mut model: BTreeMap<usize, u64> = BTreeMap::new();
        let (mut renamed, mut removed) = (0, 0);
        for _ in 0..5_000 {
            let index = rng.gen_range(0..48);
            match rng.gen_range(0..10) {
                0..=5 => {
                    // Few distinct deadlines, so that ties are frequent.
                    let deadline_ms = rng.gen_range(0..40);
                    deadlines.set(index, deadline_ms);
                    model.insert(index, deadline_ms);
                }
                6 | 7 => {
                    assert_eq!(deadlines.remove(index), model.remove(&index).is_some());
                    removed += 1;
                }
                _ => {
                    let to = rng.gen_range(0..64);
                    if model.contains_key(&index) && !model.contains_key(&to) {
                        deadlines.rename(index, to);
                        let deadline_ms = model.remove(&index).expect("present");
                        model.insert(to, deadline_ms);
                        renamed += 1;
                    }
                }
            }
            let mut expected: Vec<(u64, usize)> = model.iter().map(|(&i, &d)| (d, i)).collect();
            expected.sort_unstable();
            assert_eq!(deadlines.sorted(), expected);
            assert_eq!(deadlines.first_ms(), expected.first().map(|&(d, _)| d));
            let now_ms = rng.gen_range(0..45);
            let mut due = Vec::new();
            deadlines.for_each_due(now_ms, |index| due.push(index));
            due.sort_unstable();
            let mut expected_due: Vec<usize> = expected
                .iter()
                .filter(|&&(d, _)| d <= now_ms)
                .map(|&(_, i)| i)
                .collect();
            expected_due.sort_unstable();
            assert_eq!(due, expected_due, "due at {now_ms}");
        }
        assert!(
            renamed > 100 && removed > 500,
            "{renamed} renames, {removed} removals"
        );
        assert!(
            deadlines.len() > 10,
            "the test ends with entries to compare"
        );
    }

    /// A packed entry orders as its pair and gives both back, at the ends of their ranges.
    #[test]
    fn entries_order_as_their_pairs() {
        let values = [0, 1, 2, u64::MAX / 2, u64::MAX - 1, u64::MAX];
        let pairs: Vec<(u64, usize)> = (values.iter())
            .flat_map(|&d| values.iter().map(move |&i| (d, i as usize)))
            .collect();
        for &a in &pairs {
            let entry = Entry::new(a.0, a.1);
            assert_eq!((entry.deadline_ms(), entry.index()), a);
            for &b in &pairs {
                assert_eq!(
                    entry.cmp(&Entry::new(b.0, b.1)),
                    a.cmp(&b),
                    "{a:?} against {b:?}"
                );
            }
        }
    }

    #[test]
    fn removing_an_index_without_an_entry_changes_nothing() {
        let mut deadlines = Deadlines::default();
        assert!(!deadlines.remove(3));
        deadlines.set(1, 10);
        assert!(!deadlines.remove(0));
        assert!(!deadlines.remove(7));
        assert_eq!(deadlines.sorted(), vec![(10, 1)]);
        assert!(deadlines.remove(1));
        assert!(!deadlines.remove(1));
        assert_eq!(deadlines.first_ms(), None);
    }

    #[test]
    #[should_panic(expected = "the target has one")]
    fn renaming_onto_an_entry_is_a_bug() {
        let mut deadlines = Deadlines::default();
        deadlines.set(0, 10);
        deadlines.set(1, 20);
        deadlines.rename(0, 1);
    }
}
