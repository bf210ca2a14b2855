//! Timers on global simulated time, and the [`Sleep`] future.
//!
//! Timers are ordered by (deadline, insertion sequence): the earliest deadline is the next
//! instant time jumps to, and ties fire in the order they were set, so firing order is
//! deterministic. A dropped sleep removes its timer, so a cancelled timeout never drags
//! simulated time forward.
//!
//! The queue is a binary heap of (deadline, sequence, slot) over a slab of wakers. Removing a
//! timer frees its slot at once and leaves its heap entry behind. Such an entry is discarded
//! when it reaches the top, so the top is always a pending timer; and once such entries
//! outnumber the pending ones, all are swept in one pass (most timers are request timeouts,
//! removed when the reply comes, long before their deadline). Setting and firing a timer
//! are a heap push and pop, with no allocation once the heap and slab have grown. Each heap
//! entry is one `u128` (deadline, then sequence, then slot, high bits first), so that a sift
//! step compares one wide integer and moves 16 bytes: ordered exactly as the tuple, since
//! sequences are unique.

use crate::executor::Shared;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// A timer's identity: its deadline and insertion sequence (its order), and its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimerKey {
    pub deadline_ms: u64,
    pub sequence: u64,
    slot: u32,
}

/// A slab slot: the waker of the timer with this sequence, until it fires or is removed.
#[derive(Debug)]
struct TimerSlot {
    sequence: u64,
    waker: Option<Waker>,
    /// The node clock whose sleep set the timer, or [`GLOBAL_TIME`]: a jump of that clock
    /// wakes it early ([`TimerQueue::wakers_of_clock`]).
    clock_id: u64,
}

/// Fewest removed timers' entries swept at once ([`TimerQueue::remove`]): below it, a small
/// heap is left to discard them as they reach the top.
const REMOVED_IN_HEAP_SWEPT_MIN: usize = 32;

/// Whether heap `entry` is a pending timer's: its slot still holds its sequence and a waker
/// (a removed or fired timer's slot has none, or was reused by a later sequence).
#[inline]
fn is_pending(slots: &[TimerSlot], entry: u128) -> bool {
    let (_, sequence, slot) = heap_fields(entry);
    let slot = &slots[slot as usize];
    slot.sequence == sequence && slot.waker.is_some()
}

/// The clock id of a timer set on global simulated time, not for a node clock's sleep.
pub(crate) const GLOBAL_TIME: u64 = 0;

/// Bits of a heap entry that hold the slot, below the sequence's.
const TIMER_SLOT_BITS: u32 = 24;
/// Bits of a heap entry that hold the sequence, below the deadline's.
const TIMER_SEQUENCE_BITS: u32 = 64 - TIMER_SLOT_BITS;

/// A heap entry: `deadline_ms` in the high 64 bits, then `sequence`, then `slot`.
fn heap_entry(deadline_ms: u64, sequence: u64, slot: u32) -> u128 {
    assert!(
        sequence < 1 << TIMER_SEQUENCE_BITS && slot < 1 << TIMER_SLOT_BITS,
        "timer {sequence} in slot {slot}: beyond the heap entry's fields"
    );
    (u128::from(deadline_ms) << 64) | u128::from(sequence << TIMER_SLOT_BITS | u64::from(slot))
}

/// The (deadline, sequence, slot) of a heap entry.
#[inline]
fn heap_fields(entry: u128) -> (u64, u64, u32) {
    let low = entry as u64;
    let slot = (low & ((1 << TIMER_SLOT_BITS) - 1)) as u32;
    ((entry >> 64) as u64, low >> TIMER_SLOT_BITS, slot)
}

/// Pending timers, earliest first.
#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    /// [`heap_entry`]s, earliest on top. Entries of removed timers stay until they reach the
    /// top, where they are discarded (the top is always pending), or until they are more than
    /// half of the heap, when they all go in one pass.
    heap: BinaryHeap<Reverse<u128>>,
    slots: Vec<TimerSlot>,
    /// Free slots: every slot not holding a pending timer (a removed or fired one's).
    free: Vec<u32>,
    next_sequence: u64,
}

impl TimerQueue {
    /// Adds a timer that wakes `waker` at `deadline_ms`, set for a sleep on node clock
    /// `clock_id` (or on [`GLOBAL_TIME`]).
    pub fn insert(&mut self, deadline_ms: u64, waker: Waker, clock_id: u64) -> TimerKey {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let filled = TimerSlot {
            sequence,
            waker: Some(waker),
            clock_id,
        };
        let slot = slab_put(&mut self.slots, &mut self.free, filled);
        self.heap
            .push(Reverse(heap_entry(deadline_ms, sequence, slot)));
        TimerKey {
            deadline_ms,
            sequence,
            slot,
        }
    }

    /// Removes a timer if it has not fired.
    pub fn remove(&mut self, key: TimerKey) {
        let Some(entry) = self.slots.get_mut(key.slot as usize) else {
            return;
        };
        if entry.sequence != key.sequence || entry.waker.is_none() {
            return;
        }
        entry.waker = None;
        self.free.push(key.slot);
        self.discard_removed_top();
        let removed_in_heap = self.removed_in_heap();
        if removed_in_heap > REMOVED_IN_HEAP_SWEPT_MIN && removed_in_heap > self.heap.len() / 2 {
            self.sweep_removed();
        }
    }

    /// The earliest deadline.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.heap.peek().map(|&Reverse(entry)| heap_fields(entry).0)
    }

    /// Removes and returns the earliest timer if it is due at `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<(TimerKey, Waker)> {
        let (deadline_ms, sequence, slot) = heap_fields(self.heap.peek()?.0);
        if deadline_ms > now_ms {
            return None;
        }
        self.heap.pop();
        let waker = self.slots[slot as usize]
            .waker
            .take()
            .expect("the top timer is pending");
        self.free.push(slot);
        self.discard_removed_top();
        let key = TimerKey {
            deadline_ms,
            sequence,
            slot,
        };
        Some((key, waker))
    }

    /// Pops the entries of removed timers off the top, so that the top is pending.
    fn discard_removed_top(&mut self) {
        while let Some(&Reverse(entry)) = self.heap.peek() {
            if is_pending(&self.slots, entry) {
                return;
            }
            self.heap.pop();
        }
    }

    /// How many entries of the heap are of removed timers: each pending timer has one entry,
    /// and every slot not in `free` holds a pending timer.
    fn removed_in_heap(&self) -> usize {
        let pending = self.slots.len() - self.free.len();
        self.heap.len() - pending
    }

    /// Drops every removed timer's entry in one pass, rebuilding the heap from the pending
    /// ones: linear in the heap, where popping each at its deadline costs a sift of the heap's
    /// height, and a heap kept to the pending timers is lower for every push and pop.
    fn sweep_removed(&mut self) {
        let (slots, heap) = (&self.slots, &mut self.heap);
        heap.retain(|&Reverse(entry)| is_pending(slots, entry));
    }

    /// The wakers of the pending timers set for node clock `clock_id`, in the order the timers
    /// were set: a jump of that clock wakes them, as their sleeps may now end sooner. Each
    /// timer stays set; a woken sleep moves or keeps it. A jump is rare, so it scans the slab,
    /// and a sleep registers nowhere but here.
    pub fn wakers_of_clock(&self, clock_id: u64) -> Vec<Waker> {
        assert_ne!(clock_id, GLOBAL_TIME, "global time does not jump");
        let mut pending: Vec<(u64, &Waker)> = self
            .slots
            .iter()
            .filter(|slot| slot.clock_id == clock_id)
            .filter_map(|slot| Some((slot.sequence, slot.waker.as_ref()?)))
            .collect();
        pending.sort_unstable_by_key(|&(sequence, _)| sequence);
        pending
            .into_iter()
            .map(|(_, waker)| waker.clone())
            .collect()
    }

    /// Entries in the heap, removed timers' included.
    #[cfg(test)]
    fn heap_len(&self) -> usize {
        self.heap.len()
    }

    /// Drops every timer (at the end of a run, to break waker reference cycles).
    pub fn clear(&mut self) {
        self.heap.clear();
        self.slots.clear();
        self.free.clear();
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
    timer: Timer,
}

/// A deadline and the timer set for it, for a future that holds the executor's [`Shared`]
/// however it likes ([`Sleep`] in an `Arc`, a node clock's sleep through its clock). Its owner
/// calls [`Timer::cancel`] when dropped.
#[derive(Debug)]
pub(crate) struct Timer {
    deadline_ms: u64,
    /// The node clock it serves ([`GLOBAL_TIME`] if none): its timer is tagged with it.
    clock_id: u64,
    /// The registered timer and the identity of the waker it will wake.
    set: Option<(TimerKey, WakerIdentity)>,
}

/// What [`Waker::will_wake`] compares: a waker's data and vtable addresses. A sleep keeps the
/// identity of the waker its timer holds, not a second clone of it (a reference count up and
/// down per sleep). The identity cannot be taken by another waker meanwhile: the timer's clone
/// keeps that waker alive for as long as the sleep holds its identity (until the timer fires,
/// which is at the deadline, when the sleep completes without looking at it, or until the
/// sleep removes the timer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WakerIdentity {
    data: usize,
    vtable: usize,
}

impl WakerIdentity {
    fn of(waker: &Waker) -> Self {
        Self {
            data: waker.data() as usize,
            vtable: std::ptr::from_ref(waker.vtable()) as usize,
        }
    }
}

// A timer is popped by the runtime when time reaches its deadline, before any task is polled
// at that instant; so a sleep past its deadline has no timer left to remove, and skips the
// queue.

impl Timer {
    /// A deadline at global time `deadline_ms`, for a sleep on node clock `clock_id` (whose
    /// jumps wake it) or on [`GLOBAL_TIME`]. No timer is set until it is polled.
    #[inline]
    pub(crate) fn at(deadline_ms: u64, clock_id: u64) -> Self {
        Self {
            deadline_ms,
            clock_id,
            set: None,
        }
    }

    /// The global simulated time at which it is due.
    #[inline]
    pub(crate) fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// Ready once global time reaches the deadline; else a timer wakes `cx`'s waker then.
    #[inline]
    pub(crate) fn poll(&mut self, shared: &Shared, cx: &Context<'_>) -> Poll<()> {
        if shared.now_ms() >= self.deadline_ms {
            self.cancel(shared);
            return Poll::Ready(());
        }
        let waker = cx.waker();
        if !matches!(&self.set, Some((_, set)) if *set == WakerIdentity::of(waker)) {
            self.register(shared, waker);
        }
        Poll::Pending
    }

    /// Forgets the timer, removing it from the queue if it has not fired. Inline: most sleeps
    /// end with no timer left to remove (it fired), and a call that saved and restored every
    /// register around the queue's borrow cost more than the check.
    #[inline]
    pub(crate) fn cancel(&mut self, shared: &Shared) {
        if let Some((key, _)) = self.set.take() {
            if shared.now_ms() < self.deadline_ms {
                remove_timer(shared, key);
            }
        }
    }

    /// Sets a timer that wakes `waker` at the deadline, in place of the one set before.
    #[inline(never)]
    fn register(&mut self, shared: &Shared, waker: &Waker) {
        self.cancel(shared);
        let key = shared
            .timers()
            .insert(self.deadline_ms, waker.clone(), self.clock_id);
        self.set = Some((key, WakerIdentity::of(waker)));
    }
}

// A timer cannot remove itself when dropped (it does not hold the executor): its owner
// cancels it first, on every path, or the queue keeps waking a sleep nobody awaits and drags
// simulated time to its deadline.
impl Drop for Timer {
    fn drop(&mut self) {
        debug_assert!(self.set.is_none(), "a timer dropped without `cancel`");
    }
}

#[inline(never)]
fn remove_timer(shared: &Shared, key: TimerKey) {
    shared.timers().remove(key);
}

impl Sleep {
    /// A sleep until global time `deadline_ms`.
    #[inline]
    pub(crate) fn until(shared: Arc<Shared>, deadline_ms: u64) -> Self {
        Self {
            shared,
            timer: Timer::at(deadline_ms, GLOBAL_TIME),
        }
    }

    /// The global simulated time at which this sleep completes.
    pub fn deadline_ms(&self) -> u64 {
        self.timer.deadline_ms()
    }
}

impl Future for Sleep {
    type Output = ();

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Self { shared, timer } = &mut *self;
        timer.poll(shared, cx)
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.timer.cancel(&self.shared);
    }
}

/// Puts `value` in a free slot of `slots` (the last one freed) or a new one at the end, and
/// returns its index: the timers' slab.
fn slab_put<T>(slots: &mut Vec<T>, free: &mut Vec<u32>, value: T) -> u32 {
    match free.pop() {
        Some(slot) => {
            slots[slot as usize] = value;
            slot
        }
        None => {
            let slot = u32::try_from(slots.len()).expect("fewer than 2^32 slab slots");
            slots.push(value);
            slot
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_pop_in_deadline_then_insertion_order() {
        let mut timers = TimerQueue::default();
        let waker = Waker::noop().clone();
        let late = timers.insert(30, waker.clone(), GLOBAL_TIME);
        let first = timers.insert(10, waker.clone(), GLOBAL_TIME);
        let second = timers.insert(10, waker.clone(), GLOBAL_TIME);
        assert_eq!(timers.next_deadline_ms(), Some(10));
        assert!(timers.pop_due(9).is_none());
        assert_eq!(timers.pop_due(10).map(|(key, _)| key), Some(first));
        assert_eq!(timers.pop_due(10).map(|(key, _)| key), Some(second));
        assert!(timers.pop_due(10).is_none());
        timers.remove(late);
        assert_eq!(timers.next_deadline_ms(), None);
    }

    /// The heap fires and removes exactly as an ordered map of (deadline, sequence) would,
    /// including stale keys (fired or removed timers whose slot was reused).
    #[test]
    fn the_heap_fires_and_removes_as_an_ordered_map_does() {
        use std::collections::BTreeMap;
        let mut rng = crate::rng::DeterministicRng::new(11);
        let waker = Waker::noop().clone();
        let mut timers = TimerQueue::default();
        let mut model: BTreeMap<(u64, u64), ()> = BTreeMap::new();
        let mut keys: Vec<TimerKey> = Vec::new();
        let mut now_ms = 0;
        for _ in 0..20_000 {
            match rng.gen_range(0..4u32) {
                0 | 1 => {
                    let deadline_ms = now_ms + rng.gen_range(0..50u64);
                    let key = timers.insert(deadline_ms, waker.clone(), GLOBAL_TIME);
                    model.insert((key.deadline_ms, key.sequence), ());
                    keys.push(key);
                }
                2 if !keys.is_empty() => {
                    let key = keys[rng.choose_index(keys.len())];
                    timers.remove(key);
                    model.remove(&(key.deadline_ms, key.sequence));
                }
                _ => {
                    now_ms += rng.gen_range(0..5u64);
                    while let Some((key, _)) = timers.pop_due(now_ms) {
                        let first = model.pop_first().map(|(at, ())| at);
                        assert_eq!(first, Some((key.deadline_ms, key.sequence)));
                    }
                    assert!(model
                        .first_key_value()
                        .is_none_or(|(&(at, _), ())| at > now_ms));
                }
            }
            let expected = model.first_key_value().map(|(&(at, _), ())| at);
            assert_eq!(timers.next_deadline_ms(), expected);
            let stale = (timers.heap.iter())
                .filter(|&&Reverse(entry)| !is_pending(&timers.slots, entry))
                .count();
            assert_eq!(timers.removed_in_heap(), stale, "removed timers' entries");
        }
    }

    /// Timeouts removed long before their deadline (a request answered) do not pile up in
    /// the heap: once they outnumber the pending timers they are swept, and the timers left
    /// still fire in order.
    #[test]
    fn removed_timers_are_swept_once_they_outnumber_the_pending() {
        let waker = Waker::noop().clone();
        let mut timers = TimerQueue::default();
        let pending: Vec<TimerKey> = (0..10)
            .map(|i| timers.insert(1_000 + i, waker.clone(), GLOBAL_TIME))
            .collect();
        for i in 0..10_000 {
            // Later than every pending timer, so never at the top when removed.
            let timeout = timers.insert(5_000 + i, waker.clone(), GLOBAL_TIME);
            timers.remove(timeout);
            let bound = 2 * pending.len() + 2 * REMOVED_IN_HEAP_SWEPT_MIN + 2;
            assert!(
                timers.heap_len() <= bound,
                "{} heap entries for {} pending timers",
                timers.heap_len(),
                pending.len()
            );
        }
        let fired: Vec<TimerKey> = std::iter::from_fn(|| timers.pop_due(u64::MAX))
            .map(|(key, _)| key)
            .collect();
        assert_eq!(fired, pending);
        assert_eq!(timers.heap_len(), 0);
    }

    /// Heap entries order as (deadline, sequence) tuples do, and give their fields back.
    #[test]
    fn heap_entries_order_as_their_fields() {
        let max_sequence = (1 << TIMER_SEQUENCE_BITS) - 1;
        let max_slot = (1 << TIMER_SLOT_BITS) - 1;
        let fields = [
            (0, 0, 0),
            (0, 1, max_slot),
            (0, 2, 0),
            (1, 0, 5),
            (1, max_sequence, 0),
            (u64::MAX, 0, max_slot),
            (u64::MAX, max_sequence, max_slot),
        ];
        for window in fields.windows(2) {
            let [(d1, s1, l1), (d2, s2, l2)] = [window[0], window[1]];
            assert!(heap_entry(d1, s1, l1) < heap_entry(d2, s2, l2));
        }
        for (deadline_ms, sequence, slot) in fields {
            let entry = heap_entry(deadline_ms, sequence, slot);
            assert_eq!(heap_fields(entry), (deadline_ms, sequence, slot));
        }
    }

    /// A sleep polled by another waker moves its timer to that waker; polled again by the
    /// same waker, it keeps its one timer. Only the last waker is woken, once.
    #[test]
    fn a_sleep_wakes_the_last_waker_that_polled_it() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::task::Wake;
        struct Count(AtomicU32);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (first, second) = (
            Arc::new(Count(AtomicU32::new(0))),
            Arc::new(Count(AtomicU32::new(0))),
        );
        let (first_waker, second_waker) = (Waker::from(first.clone()), Waker::from(second.clone()));
        let shared = Arc::new(Shared::default());
        let mut sleep = Sleep::until(shared.clone(), 10);
        let mut poll = |waker: &Waker| Pin::new(&mut sleep).poll(&mut Context::from_waker(waker));
        assert!(poll(&first_waker).is_pending());
        assert!(poll(&second_waker).is_pending());
        assert!(poll(&second_waker).is_pending());
        let (_, waker) = shared.timers().pop_due(10).expect("one timer");
        assert!(
            shared.timers().pop_due(10).is_none(),
            "the first timer was removed"
        );
        waker.wake();
        assert_eq!(first.0.load(Ordering::Relaxed), 0);
        assert_eq!(second.0.load(Ordering::Relaxed), 1);
        shared.set_now_ms(10);
        assert!(poll(&first_waker).is_ready());
    }

    /// Its owner cancels a timer before dropping it: one dropped while set would stay in the
    /// queue. Debug builds check it.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "a timer dropped without `cancel`")]
    fn a_timer_dropped_while_set_is_a_bug() {
        let shared = Arc::new(Shared::default());
        let mut timer = Timer::at(10, GLOBAL_TIME);
        assert!(timer
            .poll(&shared, &Context::from_waker(Waker::noop()))
            .is_pending());
        drop(timer);
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
