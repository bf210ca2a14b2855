//! Coverage marks: production code marks the interesting moments of the protocol ("a lease
//! was taken over after it expired"), and a simulation sweep fails if a mark it expects was
//! never hit, so a fault that silently stopped firing is noticed.
//!
//! Marks are counted per thread. The simulator runs each run on one thread, so the counts it
//! takes after a run are that run's; in a real process they are cheap, unread counters. A
//! sweep that runs seeds on several threads takes each seed's hits on the thread that ran it
//! and adds them up itself.
//!
//! Code that calls the production protocol for its own purposes (a checker replaying
//! decisions) runs it [`suspended`], so that its calls are not counted as the system's. The
//! cost of marking is one map update per hit, whatever ran on the thread before: nothing here
//! grows with the number of runs a thread has made.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

thread_local! {
    static HITS: RefCell<BTreeMap<&'static str, u64>> = const { RefCell::new(BTreeMap::new()) };
    /// How many [`suspended`] calls are active on this thread.
    static SUSPENDED_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Hits counted on this thread since it started; never reset.
    static HITS_COUNTED: Cell<u64> = const { Cell::new(0) };
}

/// Counts one hit of the mark `name`, unless marking is [`suspended`] on this thread.
pub fn mark(name: &'static str) {
    if SUSPENDED_DEPTH.with(Cell::get) > 0 {
        return;
    }
    HITS_COUNTED.with(|counted| counted.set(counted.get() + 1));
    HITS.with(|hits| *hits.borrow_mut().entry(name).or_insert(0) += 1);
}

/// The marks hit on this thread since the last call, and their counts; resets them.
pub fn take_hits() -> BTreeMap<&'static str, u64> {
    HITS.with(|hits| std::mem::take(&mut *hits.borrow_mut()))
}

/// Runs `f` with marking suspended on this thread: the marks it hits are not counted, and
/// the hits counted before are left as they were. Calls nest, and marking resumes even if `f`
/// panics. Constant cost, however many hits the thread holds.
pub fn suspended<T>(f: impl FnOnce() -> T) -> T {
    /// Ends one suspension when dropped, on return or unwind.
    struct Resume;
    impl Drop for Resume {
        fn drop(&mut self) {
            SUSPENDED_DEPTH.with(|depth| {
                assert!(depth.get() > 0, "a suspension ends only once");
                depth.set(depth.get() - 1);
            });
        }
    }
    SUSPENDED_DEPTH.with(|depth| depth.set(depth.get() + 1));
    let _resume = Resume;
    f()
}

/// Hits counted on this thread since it started (never reset): the work marking has done,
/// which a test can watch for growth in deterministic units.
pub fn hits_counted() -> u64 {
    HITS_COUNTED.with(Cell::get)
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

    #[test]
    fn suspended_marks_are_not_counted_and_earlier_hits_stay() {
        let _ = take_hits();
        mark("kept");
        let counted = hits_counted();
        let inner = suspended(|| {
            mark("dropped");
            suspended(|| mark("dropped"));
            // Still suspended after the nested call ended.
            mark("dropped");
            7
        });
        assert_eq!(inner, 7);
        assert_eq!(hits_counted(), counted, "no work done for suspended marks");
        mark("kept");
        let hits = take_hits();
        assert_eq!(hits.get("kept"), Some(&2));
        assert_eq!(hits.get("dropped"), None);
    }

    #[test]
    fn marking_resumes_after_a_panic_inside_a_suspension() {
        let _ = take_hits();
        let caught = std::panic::catch_unwind(|| suspended(|| panic!("checker bug")));
        assert!(caught.is_err());
        mark("after");
        assert_eq!(take_hits().get("after"), Some(&1));
    }
}
