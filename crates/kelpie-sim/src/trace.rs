//! The trace hash: every scheduling decision, timer firing, fault decision, storage operation
//! and network delivery is folded into one 64-bit value, so two runs took the same path if and
//! only if (barring collisions) their hashes match.

use std::cell::{Cell, RefCell};

/// Starting state of the hash (the FNV-1a offset basis).
const TRACE_HASH_INITIAL: u64 = 0xcbf2_9ce4_8422_2325;
/// Odd multiplier (the golden ratio in fixed point) that spreads a tag over all bits.
const TRACE_HASH_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
/// Offset of every tag's key (digits of pi), so that no key is zero or small.
const TRACE_TAG_KEY_OFFSET: u64 = 0x243f_6a88_85a3_08d3;

/// The key an event's second word is xored with: distinct per tag (an odd multiplier is a
/// bijection), and never a value a payload word plausibly takes (a zero operand would clear
/// the hash).
#[inline]
const fn tag_key(tag: u64) -> u64 {
    tag.wrapping_mul(TRACE_HASH_MULTIPLIER) ^ TRACE_TAG_KEY_OFFSET
}

/// Tags that start each traced event, so that equal payloads of different events differ.
pub(crate) mod event {
    /// An executor step: step number, task id.
    pub const STEP: u64 = 1;
    /// Simulated time jumped: new time.
    pub const TIME: u64 = 2;
    /// A timer fired: deadline, sequence.
    pub const TIMER: u64 = 3;
    /// A fault decision: fault index, fired or not.
    pub const FAULT: u64 = 4;
    /// A storage operation: store, kind, key hash, outcome.
    pub const STORAGE: u64 = 5;
    /// A network send: route, delivery time.
    pub const NET_SEND: u64 = 6;
    /// A network delivery or drop: route, outcome.
    pub const NET_DELIVER: u64 = 7;
    /// An event folded in by the scenario.
    pub const USER: u64 = 8;
    /// A task was spawned: task id.
    pub const SPAWN: u64 = 9;
}

/// The running trace hash, plus (when checking determinism) the hash after every step.
#[derive(Debug)]
pub(crate) struct Trace {
    hash: Cell<u64>,
    step_hashes: RefCell<Vec<u64>>,
    recording: bool,
}

impl Trace {
    /// A fresh trace; `recording` keeps the hash after every step for later comparison.
    pub fn new(recording: bool) -> Self {
        Self {
            hash: Cell::new(TRACE_HASH_INITIAL),
            step_hashes: RefCell::new(Vec::new()),
            recording,
        }
    }

    /// Folds an event tag and two payload words into the hash: one 64 × 64 → 128-bit multiply
    /// of the hash and the first word against the second word and the tag's key, the halves
    /// of the product xored (the folded multiply of wyhash and foldhash, which mixes every
    /// input bit into the result). A zero operand would clear the hash: the key side cannot be
    /// zero for the payloads traced (see [`tag_key`]), and the hash side is zero only when a
    /// first word equals the running hash, a chance of one in 2^64. A fixed function, unlike
    /// `std`'s randomly keyed SipHash, so the value is stable across processes. One multiply
    /// per event: a delivered message traces two events, a step one.
    #[inline]
    pub fn event(&self, tag: u64, first: u64, second: u64) {
        let state = self.hash.get() ^ first;
        let keyed = second ^ tag_key(tag);
        let product = u128::from(state) * u128::from(keyed);
        self.hash.set((product as u64) ^ ((product >> 64) as u64));
    }

    /// The hash so far.
    pub fn hash(&self) -> u64 {
        self.hash.get()
    }

    /// Records the hash at the end of a step, if recording.
    #[inline]
    pub fn end_step(&self) {
        if self.recording {
            self.step_hashes.borrow_mut().push(self.hash.get());
        }
    }

    /// The recorded per-step hashes (empty unless recording).
    pub fn take_step_hashes(&self) -> Vec<u64> {
        self.step_hashes.take()
    }
}

/// The first step (1-based) at which two runs' per-step hashes differ, if any.
pub(crate) fn first_divergent_step(first: &[u64], second: &[u64]) -> Option<u64> {
    let common = first.iter().zip(second).position(|(a, b)| a != b);
    let index = match common {
        Some(index) => index,
        None if first.len() != second.len() => first.len().min(second.len()),
        None => return None,
    };
    Some(u64::try_from(index).expect("step count fits u64") + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_content_change_the_hash() {
        let a = Trace::new(false);
        a.event(event::STEP, 1, 2);
        let b = Trace::new(false);
        b.event(event::STEP, 2, 1);
        assert_ne!(a.hash(), b.hash());
        let c = Trace::new(false);
        c.event(event::STEP, 1, 2);
        assert_eq!(a.hash(), c.hash());
        let d = Trace::new(false);
        d.event(event::TIME, 1, 2);
        assert_ne!(a.hash(), d.hash(), "the tag counts");
    }

    /// Every small payload of every tag, zeros included, leads to its own hash, none of them
    /// zero: no event of the kind the simulator traces clears or merges the history.
    #[test]
    fn small_payloads_of_every_tag_lead_to_distinct_hashes() {
        let mut seen = std::collections::BTreeSet::new();
        for tag in [0, event::STEP, event::TIME, event::USER, event::SPAWN] {
            for first in (0..64).chain([u64::MAX]) {
                for second in (0..64).chain([u64::MAX]) {
                    let trace = Trace::new(false);
                    trace.event(event::STEP, 7, 3);
                    trace.event(tag, first, second);
                    assert_ne!(trace.hash(), 0);
                    assert!(seen.insert(trace.hash()), "{tag} {first} {second}");
                }
            }
        }
    }

    #[test]
    fn finds_first_divergent_step() {
        assert_eq!(first_divergent_step(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_divergent_step(&[1, 2, 3], &[1, 9, 3]), Some(2));
        assert_eq!(first_divergent_step(&[1, 2], &[1, 2, 3]), Some(3));
        let recording = Trace::new(true);
        recording.event(event::USER, 5, 0);
        recording.end_step();
        assert_eq!(recording.take_step_hashes(), vec![recording.hash()]);
    }
}
