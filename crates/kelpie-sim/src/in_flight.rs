//! Messages in flight, by delivery instant: a timing wheel when every delivery falls within a
//! short window of now (the usual case: latencies of milliseconds), an ordered map otherwise.
//!
//! Both deliver the same messages in the same order: by instant, and in send order within an
//! instant. The wheel has one bucket per millisecond of the window, indexed by instant modulo
//! its size, and a bitmap of the buckets in use, so a send is an index and a push, and finding
//! the next instant is a scan of a few words instead of a search of a tree.
//!
//! The wheel's buckets are lists chained through one slab of entries, not a buffer each:
//! entries freed by a delivery are reused first by the next sends, so the memory a send
//! writes is memory just touched, however many buckets the window has.

use std::collections::{BTreeMap, VecDeque};

/// Largest window a wheel covers, in ms; longer latency ranges use the ordered map.
pub(crate) const WHEEL_SLOTS_MAX: u64 = 4_096;

pub(crate) enum InFlightQueue<T> {
    Wheel(Wheel<T>),
    Map {
        buckets: BTreeMap<u64, VecDeque<T>>,
        /// Emptied buckets kept for reuse, so steady traffic allocates nothing.
        spare: Vec<VecDeque<T>>,
    },
}

/// No entry: the end of a bucket's list, or an empty bucket.
const ENTRY_NONE: u32 = u32::MAX;

/// A bucket: the first and last entry of its list, in send order.
#[derive(Debug, Clone, Copy)]
struct SlotList {
    head: u32,
    tail: u32,
}

impl SlotList {
    const EMPTY: Self = Self {
        head: ENTRY_NONE,
        tail: ENTRY_NONE,
    };
}

/// A message in flight and the next entry of its bucket.
struct Entry<T> {
    next: u32,
    /// `None` while the entry is free.
    item: Option<T>,
}

pub(crate) struct Wheel<T> {
    /// One list per slot.
    slots: Vec<SlotList>,
    /// `slots.len() - 1`: the slot of instant `at_ms` is `at_ms & slot_mask`.
    slot_mask: u64,
    /// Every message in flight, chained into its slot's list; free entries are chained too.
    entries: Vec<Entry<T>>,
    /// The first free entry (the last freed, reused first), or `ENTRY_NONE`.
    free_head: u32,
    /// Bit `i` set: slot `i` holds messages.
    occupied: Vec<u64>,
    /// The earliest instant with messages, if any. Every message in flight is due within one
    /// turn of the wheel from it.
    earliest_ms: Option<u64>,
}

impl<T> InFlightQueue<T> {
    /// A queue for deliveries at most `delay_ms_max` after their send.
    pub(crate) fn new(delay_ms_max: u64) -> Self {
        let slots = (delay_ms_max + 1).next_power_of_two();
        if slots > WHEEL_SLOTS_MAX {
            return InFlightQueue::Map {
                buckets: BTreeMap::new(),
                spare: Vec::new(),
            };
        }
        let count = usize::try_from(slots).expect("at most WHEEL_SLOTS_MAX");
        InFlightQueue::Wheel(Wheel {
            slots: vec![SlotList::EMPTY; count],
            slot_mask: slots - 1,
            entries: Vec::new(),
            free_head: ENTRY_NONE,
            occupied: vec![0; count.div_ceil(64)],
            earliest_ms: None,
        })
    }

    /// Adds `item`, due at `at_ms`, sent at `now_ms`. Returns whether `at_ms` became the
    /// earliest instant (rarely: the caller publishes it then, and only then). Always inlined:
    /// it is most of a send.
    #[inline(always)]
    pub(crate) fn push(&mut self, now_ms: u64, at_ms: u64, item: T) -> bool {
        match self {
            InFlightQueue::Wheel(wheel) => wheel.push(now_ms, at_ms, item),
            InFlightQueue::Map { buckets, spare } => push_to_map(buckets, spare, at_ms, item),
        }
    }

    /// The earliest instant with a message due.
    pub(crate) fn next_deadline_ms(&self) -> Option<u64> {
        match self {
            InFlightQueue::Wheel(wheel) => wheel.earliest_ms,
            InFlightQueue::Map { buckets, .. } => buckets.first_key_value().map(|(&at, _)| at),
        }
    }

    /// Moves the messages of the earliest instant, if it is due at `now_ms`, to the end of
    /// `out`, in send order. Returns whether there were any.
    #[cfg(test)]
    pub(crate) fn take_due(&mut self, now_ms: u64, out: &mut Vec<T>) -> bool {
        let Some(at_ms) = self.next_deadline_ms().filter(|&at_ms| at_ms <= now_ms) else {
            return false;
        };
        while self.next_deadline_ms() == Some(at_ms) {
            out.extend(self.pop_due(now_ms));
        }
        true
    }

    /// Removes and returns the first message of the earliest instant, if that instant is due
    /// at `now_ms`: popping until `None` gives every due message, by instant, in send order.
    /// One at a time, so that the caller's delivery inlines into its loop.
    #[inline]
    pub(crate) fn pop_due(&mut self, now_ms: u64) -> Option<T> {
        match self {
            InFlightQueue::Wheel(wheel) => wheel.pop_due(now_ms),
            InFlightQueue::Map { buckets, spare } => {
                let mut entry = buckets.first_entry()?;
                if *entry.key() > now_ms {
                    return None;
                }
                let item = entry.get_mut().pop_front();
                if entry.get().is_empty() {
                    spare.push(entry.remove());
                }
                item
            }
        }
    }
}

/// [`InFlightQueue::push`] for the map: kept out of line, so that the send it inlines into
/// holds the wheel's path only.
#[cold]
#[inline(never)]
fn push_to_map<T>(
    buckets: &mut BTreeMap<u64, VecDeque<T>>,
    spare: &mut Vec<VecDeque<T>>,
    at_ms: u64,
    item: T,
) -> bool {
    let earliest = buckets.first_key_value().is_none_or(|(&at, _)| at_ms < at);
    buckets
        .entry(at_ms)
        .or_insert_with(|| spare.pop().unwrap_or_default())
        .push_back(item);
    earliest
}

impl<T> Wheel<T> {
    fn mask(&self) -> u64 {
        self.slot_mask
    }

    #[inline(always)]
    fn push(&mut self, now_ms: u64, at_ms: u64, item: T) -> bool {
        assert!(
            at_ms >= now_ms && at_ms - now_ms <= self.slot_mask,
            "a delivery at {at_ms} ms sent at {now_ms} ms is outside the wheel's window"
        );
        let slot = (at_ms & self.slot_mask) as usize;
        let index = match self.free_head {
            ENTRY_NONE => {
                let index = u32::try_from(self.entries.len())
                    .ok()
                    .filter(|&index| index != ENTRY_NONE)
                    .expect("fewer than 2^32 - 1 messages in flight");
                self.entries.push(Entry {
                    next: ENTRY_NONE,
                    item: Some(item),
                });
                index
            }
            index => {
                let entry = &mut self.entries[index as usize];
                self.free_head = entry.next;
                entry.next = ENTRY_NONE;
                entry.item = Some(item);
                index
            }
        };
        let list = &mut self.slots[slot];
        if list.head == ENTRY_NONE {
            list.head = index;
            self.occupied[slot / 64] |= 1 << (slot % 64);
        } else {
            self.entries[list.tail as usize].next = index;
        }
        list.tail = index;
        match self.earliest_ms {
            Some(earliest_ms) if earliest_ms <= at_ms => false,
            _ => {
                self.earliest_ms = Some(at_ms);
                true
            }
        }
    }

    #[inline]
    fn pop_due(&mut self, now_ms: u64) -> Option<T> {
        let at_ms = self.earliest_ms.filter(|&at_ms| at_ms <= now_ms)?;
        let slot = (at_ms & self.mask()) as usize;
        let list = &mut self.slots[slot];
        // The earliest instant's slot is never empty, so `head` is an entry.
        let index = list.head;
        let entry = &mut self.entries[index as usize];
        let item = entry.item.take().expect("a listed entry holds a message");
        list.head = entry.next;
        entry.next = self.free_head;
        self.free_head = index;
        if list.head == ENTRY_NONE {
            *list = SlotList::EMPTY;
            self.occupied[slot / 64] &= !(1 << (slot % 64));
            self.earliest_ms = self.next_occupied_after(at_ms);
        }
        Some(item)
    }

    /// The first instant after `at_ms` with messages: the first occupied slot after its slot,
    /// going round once (every message in flight is due within one turn of the wheel).
    fn next_occupied_after(&self, at_ms: u64) -> Option<u64> {
        let slots = self.slots.len();
        let start = ((at_ms + 1) & self.mask()) as usize;
        for (from, to) in [(start, slots), (0, start)] {
            if let Some(slot) = self.first_occupied(from, to) {
                // The slot count is a power of two: the mask is the modulo, without a division.
                let offset = (slot + slots - start) & (slots - 1);
                return Some(at_ms + 1 + offset as u64);
            }
        }
        None
    }

    /// The first occupied slot in `from..to`.
    fn first_occupied(&self, from: usize, to: usize) -> Option<usize> {
        let mut slot = from;
        while slot < to {
            let word = self.occupied[slot / 64] >> (slot % 64);
            if word != 0 {
                let found = slot + word.trailing_zeros() as usize;
                return (found < to).then_some(found);
            }
            slot = (slot / 64 + 1) * 64;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wheel and the map deliver the same messages at the same instants in the same order.
    #[test]
    fn the_wheel_delivers_as_the_ordered_map_does() {
        let mut rng = crate::rng::DeterministicRng::new(7);
        for delay_ms_max in [0, 1, 5, 63, 64, 200] {
            let mut wheel = InFlightQueue::new(delay_ms_max);
            assert!(matches!(wheel, InFlightQueue::Wheel(_)));
            let mut map = InFlightQueue::Map {
                buckets: BTreeMap::new(),
                spare: Vec::new(),
            };
            let (mut now_ms, mut sent, mut delivered) = (0u64, 0u64, 0u64);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..5_000 {
                for _ in 0..rng.gen_range(0..4u64) {
                    let at_ms = now_ms + rng.gen_range(0..=delay_ms_max);
                    let before = wheel.next_deadline_ms();
                    let earliest = wheel.push(now_ms, at_ms, sent);
                    assert_eq!(earliest, map.push(now_ms, at_ms, sent));
                    assert_eq!(earliest, before != wheel.next_deadline_ms());
                    sent += 1;
                }
                assert_eq!(wheel.next_deadline_ms(), map.next_deadline_ms());
                let Some(next_ms) = wheel.next_deadline_ms() else {
                    now_ms += 1;
                    continue;
                };
                now_ms = next_ms;
                while wheel.take_due(now_ms, &mut a) {
                    assert!(map.take_due(now_ms, &mut b));
                    assert_eq!(a, b);
                    delivered += a.len() as u64;
                    a.clear();
                    b.clear();
                }
                assert!(!map.take_due(now_ms, &mut b));
            }
            assert!(delivered > 1_000, "{delivered}");
        }
    }
}
