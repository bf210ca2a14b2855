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
//! cost of marking is one short scan per hit, over the marks hit since they were last taken,
//! whatever ran on the thread before: nothing here grows with the number of runs a thread has
//! made.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

/// One thread's marking state, behind one thread-local lookup per hit.
struct Marks {
    /// Each mark hit since the last [`take_hits`], and its count, in the order first hit. A
    /// handful of names: a scan finds one by address (each call site passes the same
    /// constant) before it compares any text.
    hits: RefCell<Vec<(&'static str, u64)>>,
    /// How many [`suspended`] calls are active on this thread.
    suspended_depth: Cell<u32>,
    /// Hits counted on this thread since it started; never reset.
    hits_counted: Cell<u64>,
}

thread_local! {
    static MARKS: Marks = const {
        Marks {
            hits: RefCell::new(Vec::new()),
            suspended_depth: Cell::new(0),
            hits_counted: Cell::new(0),
        }
    };
}

/// Counts one hit of the mark `name`, unless marking is [`suspended`] on this thread.
pub fn mark(name: &'static str) {
    MARKS.with(|marks| {
        if marks.suspended_depth.get() > 0 {
            return;
        }
        marks.hits_counted.set(marks.hits_counted.get() + 1);
        let mut hits = marks.hits.borrow_mut();
        let same = |(hit, _): &(&'static str, u64)| std::ptr::eq(*hit, name);
        // By address first; the same text at another address (a copy of the constant) is
        // still the same mark.
        let at = hits
            .iter()
            .position(same)
            .or_else(|| hits.iter().position(|(hit, _)| *hit == name));
        match at {
            Some(at) => hits[at].1 += 1,
            None => hits.push((name, 1)),
        }
    });
}

/// The marks hit on this thread since the last call, and their counts; resets them.
pub fn take_hits() -> BTreeMap<&'static str, u64> {
    MARKS.with(|marks| marks.hits.take().into_iter().collect())
}

/// Runs `f` with marking suspended on this thread: the marks it hits are not counted, and
/// the hits counted before are left as they were. Calls nest, and marking resumes even if `f`
/// panics. Constant cost, however many hits the thread holds.
pub fn suspended<T>(f: impl FnOnce() -> T) -> T {
    /// Ends one suspension when dropped, on return or unwind.
    struct Resume;
    impl Drop for Resume {
        fn drop(&mut self) {
            MARKS.with(|marks| {
                let depth = marks.suspended_depth.get();
                assert!(depth > 0, "a suspension ends only once");
                marks.suspended_depth.set(depth - 1);
            });
        }
    }
    MARKS.with(|marks| marks.suspended_depth.set(marks.suspended_depth.get() + 1));
    let _resume = Resume;
    f()
}

/// Hits counted on this thread since it started (never reset): the work marking has done,
/// which a test can watch for growth in deterministic units.
pub fn hits_counted() -> u64 {
    MARKS.with(|marks| marks.hits_counted.get())
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

    /// A mark is its text: the same name at another address is the same mark.
    #[test]
    fn a_copy_of_a_name_counts_as_the_same_mark() {
        let _ = take_hits();
        let copy: &'static str = Box::leak(String::from("copied").into_boxed_str());
        assert!(
            !std::ptr::eq(copy, "copied"),
            "the copy has its own address"
        );
        mark("copied");
        mark(copy);
        mark("other");
        mark(copy);
        let hits = take_hits();
        assert_eq!(hits.len(), 2, "{hits:?}");
        assert_eq!(hits.get("copied"), Some(&3));
        assert_eq!(hits.get("other"), Some(&1));
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
