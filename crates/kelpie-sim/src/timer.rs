//! Timers on global simulated time, and the [`Sleep`] future.
//!
//! Timers are kept in a map ordered by (deadline, insertion sequence): the earliest deadline
//! is the next instant time jumps to, and ties fire in the order they were set, so firing
//! order is deterministic. A dropped sleep removes its timer, so a cancelled timeout never
//! drags simulated time forward.

use crate::executor::Shared;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// A timer's identity: its deadline and its insertion sequence number.
pub(crate) type TimerKey = (u64, u64);

/// Pending timers, earliest first.
#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    entries: BTreeMap<TimerKey, Waker>,
    next_sequence: u64,
}

impl TimerQueue {
    /// Adds a timer that wakes `waker` at `deadline_ms`.
    pub fn insert(&mut self, deadline_ms: u64, waker: Waker) -> TimerKey {
        let key = (deadline_ms, self.next_sequence);
        self.next_sequence += 1;
        self.entries.insert(key, waker);
        key
    }

    /// Removes a timer if it has not fired.
    pub fn remove(&mut self, key: TimerKey) {
        self.entries.remove(&key);
    }

    /// The earliest deadline.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.entries
            .first_key_value()
            .map(|(&(deadline_ms, _), _)| deadline_ms)
    }

    /// Removes and returns the earliest timer if it is due at `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<(TimerKey, Waker)> {
        let entry = self.entries.first_entry()?;
        if entry.key().0 > now_ms {
            return None;
        }
        let key = *entry.key();
        Some((key, entry.remove()))
    }

    /// Drops every timer (at the end of a run, to break waker reference cycles).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Whole milliseconds in `duration`, rounded up so that a sleep never ends early.
pub(crate) fn duration_to_ms_ceil(duration: Duration) -> u64 {
    let whole_ms = duration.as_millis();
    let partial = u128::from(!duration.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(whole_ms + partial).unwrap_or(u64::MAX)
}

/// A future that completes once global simulated time reaches its deadline.
///
/// It is `Send`, so it can back a [`kelpie_core::Clock`]'s sleep.
#[derive(Debug)]
#[must_use = "a Sleep does nothing unless awaited"]
pub struct Sleep {
    shared: Arc<Shared>,
    deadline_ms: u64,
    /// The registered timer and the waker it will wake.
    timer: Option<(TimerKey, Waker)>,
}

// A timer is popped by the runtime when time reaches its deadline, before any task is polled
// at that instant; so a sleep past its deadline has no timer left to remove, and skips the
// lock.

impl Sleep {
    /// A sleep until global time `deadline_ms`.
    #[inline]
    pub(crate) fn until(shared: Arc<Shared>, deadline_ms: u64) -> Self {
        Self {
            shared,
            deadline_ms,
            timer: None,
        }
    }

    /// The global simulated time at which this sleep completes.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    fn cancel(&mut self) {
        if let Some((key, _)) = self.timer.take() {
            if self.shared.now_ms() < self.deadline_ms {
                self.shared.timers().remove(key);
            }
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.shared.now_ms() >= self.deadline_ms {
            self.cancel();
            return Poll::Ready(());
        }
        let registered = matches!(&self.timer, Some((_, waker)) if waker.will_wake(cx.waker()));
        if !registered {
            self.cancel();
            let key = self
                .shared
                .timers()
                .insert(self.deadline_ms, cx.waker().clone());
            self.timer = Some((key, cx.waker().clone()));
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_pop_in_deadline_then_insertion_order() {
        let mut timers = TimerQueue::default();
        let waker = Waker::noop().clone();
        let late = timers.insert(30, waker.clone());
        let first = timers.insert(10, waker.clone());
        let second = timers.insert(10, waker.clone());
        assert_eq!(timers.next_deadline_ms(), Some(10));
        assert!(timers.pop_due(9).is_none());
        assert_eq!(timers.pop_due(10).map(|(key, _)| key), Some(first));
        assert_eq!(timers.pop_due(10).map(|(key, _)| key), Some(second));
        assert!(timers.pop_due(10).is_none());
        timers.remove(late);
        assert_eq!(timers.next_deadline_ms(), None);
    }

    #[test]
    fn durations_round_up_to_whole_ms() {
        assert_eq!(duration_to_ms_ceil(Duration::ZERO), 0);
        assert_eq!(duration_to_ms_ceil(Duration::from_micros(1)), 1);
        assert_eq!(duration_to_ms_ceil(Duration::from_millis(7)), 7);
        assert_eq!(duration_to_ms_ceil(Duration::from_micros(7_001)), 8);
        assert_eq!(duration_to_ms_ceil(Duration::MAX), u64::MAX);
    }
}
