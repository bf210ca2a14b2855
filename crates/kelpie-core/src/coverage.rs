//! Coverage marks: production code marks the interesting moments of the protocol ("a lease
//! was taken over after it expired"), and a simulation sweep fails if a mark it expects was
//! never hit, so a fault that silently stopped firing is noticed.
//!
//! Marks are counted per thread. The simulator runs each run on one thread, so the counts it
//! takes after a run are that run's; in a real process they are cheap, unread counters.

use std::cell::RefCell;
use std::collections::BTreeMap;

thread_local! {
    static HITS: RefCell<BTreeMap<&'static str, u64>> = const { RefCell::new(BTreeMap::new()) };
}

/// Counts one hit of the mark `name`.
pub fn mark(name: &'static str) {
    HITS.with(|hits| *hits.borrow_mut().entry(name).or_insert(0) += 1);
}

/// The marks hit on this thread since the last call, and their counts; resets them.
pub fn take_hits() -> BTreeMap<&'static str, u64> {
    HITS.with(|hits| std::mem::take(&mut *hits.borrow_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_counted_and_taken() {
        let _ = take_hits();
        mark("a");
        mark("a");
        mark("b");
        let hits = take_hits();
        assert_eq!(hits.get("a"), Some(&2));
        assert_eq!(hits.get("b"), Some(&1));
        assert!(take_hits().is_empty());
    }
}
