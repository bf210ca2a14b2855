//! What a session knows of its keys, indexed so that finding the abandoned ones costs
//! O(log n) per key found, not a scan of every key the node holds.
//!
//! A node renewing n actors runs [`Tracked::stale`] after each of its keepalives, that is
//! about once per renewal: a scan would make each renewal cost O(n) and a node's renewals
//! O(n²) per lease duration. Instead every key sits in one of two ordered sets:
//! - `fresh`, by the send time of the node's last request on it, while that is less than a
//!   lease duration before the latest sweep;
//! - `due`, by when it was last looked at as possibly abandoned, once it is not.
//!
//! A sweep moves the keys whose last request aged past a lease duration from the front of
//! `fresh` to `due`, each once per time it goes quiet; a request on a key moves it back.
//! A request on every key at once (a keepalive of the whole node) is one number,
//! `all_sent_ms`, not n updates: a key's last request is the later of its own and that one.

use std::collections::{BTreeMap, BTreeSet};

use kelpie_core::ActorId;

/// What the node knows of one of its session's keys: the create revision (0 while unknown:
/// an acquire whose reply was lost), when it was acquired, and when the node last sent a
/// request on it.
#[derive(Debug, Clone, Copy)]
struct Acquired {
    create_revision: i64,
    acquired_at_ms: u64,
    /// Send time of the node's latest acquire or renewal of the actor, noted before sending
    /// (not counting requests on every key, see [`Tracked::all_sent_ms`]).
    last_sent_ms: u64,
    /// When the key was last looked at as possibly abandoned.
    last_checked_ms: u64,
}

/// A session's keys, with the index that finds the abandoned ones.
#[derive(Debug)]
pub(super) struct Tracked {
    lease_duration_ms: u64,
    entries: BTreeMap<ActorId, Acquired>,
    /// Keys whose own last request was sent after `swept_at_ms - lease_duration_ms`, by its
    /// send time.
    fresh: BTreeSet<(u64, ActorId)>,
    /// The other keys, by when they were last looked at.
    due: BTreeSet<(u64, ActorId)>,
    /// The `now_ms` of the latest sweep: a key is in `due` exactly when its own last request
    /// was sent a lease duration or more before it.
    swept_at_ms: u64,
    /// Send time of the latest request on every key of the session.
    all_sent_ms: u64,
}

impl Tracked {
    /// No keys; a key is abandoned once nothing was sent on it for `lease_duration_ms`.
    pub fn new(lease_duration_ms: u64) -> Self {
        Self {
            lease_duration_ms,
            entries: BTreeMap::new(),
            fresh: BTreeSet::new(),
            due: BTreeSet::new(),
            swept_at_ms: 0,
            all_sent_ms: 0,
        }
    }

    /// Notes a request on `actor_id` about to be sent at `sent_at_ms`, noting the key as
    /// acquired then, at an unknown revision, if it is new.
    pub fn note_sent(&mut self, actor_id: &ActorId, sent_at_ms: u64) {
        self.note(actor_id, sent_at_ms, None);
    }

    /// Notes a request on every key, sent at `sent_at_ms`.
    pub fn note_sent_all(&mut self, sent_at_ms: u64) {
        self.all_sent_ms = self.all_sent_ms.max(sent_at_ms);
    }

    /// Notes that `actor_id`'s key was created at `create_revision` by a request sent at
    /// `at_ms`: a new tenure starts then unless this one was already known.
    pub fn remember_acquired(&mut self, actor_id: &ActorId, create_revision: i64, at_ms: u64) {
        self.note(actor_id, at_ms, Some(create_revision));
    }

    fn note(&mut self, actor_id: &ActorId, sent_at_ms: u64, create_revision: Option<i64>) {
        let previous = self.entries.get(actor_id).copied();
        let mut entry = previous.unwrap_or(Acquired {
            create_revision: create_revision.unwrap_or(0),
            acquired_at_ms: sent_at_ms,
            last_sent_ms: sent_at_ms,
            last_checked_ms: 0,
        });
        if let Some(revision) = create_revision.filter(|&r| r != entry.create_revision) {
            entry.create_revision = revision;
            entry.acquired_at_ms = sent_at_ms;
        }
        entry.last_sent_ms = entry.last_sent_ms.max(sent_at_ms);
        if let Some(previous) = previous {
            self.unindex(actor_id, &previous);
        }
        self.index(actor_id, &entry);
        self.entries.insert(actor_id.clone(), entry);
    }

    /// Forgets `actor_id` if nothing was sent on it since `last_sent_ms` (a time
    /// [`Tracked::stale`] returned).
    pub fn forget_unless_sent_since(&mut self, actor_id: &ActorId, last_sent_ms: u64) {
        if self.nothing_sent_since(actor_id, last_sent_ms) {
            if let Some(entry) = self.entries.remove(actor_id) {
                self.unindex(actor_id, &entry);
            }
        }
    }

    /// Whether nothing was sent on `actor_id` since `last_sent_ms` (a time
    /// [`Tracked::stale`] returned).
    pub fn nothing_sent_since(&self, actor_id: &ActorId, last_sent_ms: u64) -> bool {
        self.entries
            .get(actor_id)
            .is_none_or(|entry| self.last_sent_ms(entry) <= last_sent_ms)
    }

    /// When the key `actor_id` has at `create_revision` was acquired, if it is the one known.
    pub fn acquired_at_ms(&self, actor_id: &ActorId, create_revision: i64) -> Option<u64> {
        self.entries
            .get(actor_id)
            .filter(|entry| entry.create_revision == create_revision)
            .map(|entry| entry.acquired_at_ms)
    }

    /// Up to `count` of the keys on which nothing was sent for a lease duration before
    /// `now_ms`, with the send time of their last request, the ones looked at longest ago
    /// first (ties by actor id), marked as looked at `now_ms`. A key looked at less than a
    /// lease duration ago is left for later, so each key costs its caller at most one look
    /// per lease duration, however often it asks.
    pub fn stale(&mut self, now_ms: u64, count: usize) -> Vec<(ActorId, u64)> {
        if self.all_sent_ms.saturating_add(self.lease_duration_ms) > now_ms {
            // A request on every key went out less than a lease duration ago.
            return Vec::new();
        }
        self.sweep(now_ms);
        // `due` is ordered by when each key was last looked at, so the ones looked at within
        // the last lease duration are all at its end.
        let looked_at_before_ms = now_ms.saturating_sub(self.lease_duration_ms);
        let picked: Vec<(u64, ActorId)> = (self.due.iter())
            .take_while(|(last_checked_ms, _)| *last_checked_ms <= looked_at_before_ms)
            .take(count)
            .cloned()
            .collect();
        let mut stale = Vec::with_capacity(picked.len());
        for (last_checked_ms, actor_id) in picked {
            self.due.remove(&(last_checked_ms, actor_id.clone()));
            self.due.insert((now_ms, actor_id.clone()));
            let entry = self
                .entries
                .get_mut(&actor_id)
                .expect("every indexed key has an entry");
            entry.last_checked_ms = now_ms;
            let last_sent_ms = entry.last_sent_ms.max(self.all_sent_ms);
            stale.push((actor_id, last_sent_ms));
        }
        stale
    }

    /// Brings the split between `fresh` and `due` to `now_ms`.
    fn sweep(&mut self, now_ms: u64) {
        if now_ms < self.swept_at_ms {
            // The clock went back: keys quiet by the old reading may not be by this one.
            self.swept_at_ms = now_ms;
            let back: Vec<(u64, ActorId)> = self
                .due
                .iter()
                .filter(|(_, actor_id)| !self.is_due(&self.entries[actor_id]))
                .cloned()
                .collect();
            for (last_checked_ms, actor_id) in back {
                self.due.remove(&(last_checked_ms, actor_id.clone()));
                let last_sent_ms = self.entries[&actor_id].last_sent_ms;
                self.fresh.insert((last_sent_ms, actor_id));
            }
            return;
        }
        self.swept_at_ms = now_ms;
        while let Some((last_sent_ms, actor_id)) = self.fresh.first().cloned() {
            if last_sent_ms.saturating_add(self.lease_duration_ms) > now_ms {
                break;
            }
            self.fresh.pop_first();
            let last_checked_ms = self.entries[&actor_id].last_checked_ms;
            self.due.insert((last_checked_ms, actor_id));
        }
    }

    fn last_sent_ms(&self, entry: &Acquired) -> u64 {
        entry.last_sent_ms.max(self.all_sent_ms)
    }

    fn is_due(&self, entry: &Acquired) -> bool {
        entry.last_sent_ms.saturating_add(self.lease_duration_ms) <= self.swept_at_ms
    }

    fn index(&mut self, actor_id: &ActorId, entry: &Acquired) {
        let inserted = if self.is_due(entry) {
            self.due.insert((entry.last_checked_ms, actor_id.clone()))
        } else {
            self.fresh.insert((entry.last_sent_ms, actor_id.clone()))
        };
        debug_assert!(inserted, "a key is indexed once");
    }

    fn unindex(&mut self, actor_id: &ActorId, entry: &Acquired) {
        let removed = if self.is_due(entry) {
            self.due.remove(&(entry.last_checked_ms, actor_id.clone()))
        } else {
            self.fresh.remove(&(entry.last_sent_ms, actor_id.clone()))
        };
        assert!(removed, "every key is indexed where its entry says");
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let indexed = self.fresh.len() + self.due.len();
        assert_eq!(indexed, self.entries.len(), "every key is indexed once");
        indexed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const LEASE_DURATION_MS: u64 = 1_000;

    fn actor(index: u8) -> ActorId {
        ActorId::new(format!("actor-{index}")).expect("valid id")
    }

    /// The scan every session ran before the index: the reference the index must agree with.
    #[derive(Default)]
    struct Scan {
        entries: BTreeMap<ActorId, (i64, u64, u64, u64)>,
    }

    impl Scan {
        fn note(&mut self, actor_id: &ActorId, at_ms: u64, create_revision: Option<i64>) {
            let entry = self.entries.entry(actor_id.clone()).or_insert((
                create_revision.unwrap_or(0),
                at_ms,
                at_ms,
                0,
            ));
            if let Some(revision) = create_revision.filter(|&r| r != entry.0) {
                entry.0 = revision;
                entry.1 = at_ms;
            }
            entry.2 = entry.2.max(at_ms);
        }

        fn note_sent_all(&mut self, at_ms: u64) {
            for entry in self.entries.values_mut() {
                entry.2 = entry.2.max(at_ms);
            }
        }

        fn stale(&mut self, now_ms: u64, count: usize) -> Vec<(ActorId, u64)> {
            let mut stale: Vec<(u64, ActorId, u64)> = self
                .entries
                .iter()
                .filter(|(_, e)| e.2 + LEASE_DURATION_MS <= now_ms)
                .filter(|(_, e)| e.3 + LEASE_DURATION_MS <= now_ms)
                .map(|(actor_id, e)| (e.3, actor_id.clone(), e.2))
                .collect();
            stale.sort_unstable();
            stale.truncate(count);
            for (_, actor_id, _) in &stale {
                self.entries.get_mut(actor_id).expect("listed").3 = now_ms;
            }
            stale.into_iter().map(|(_, a, sent)| (a, sent)).collect()
        }

        fn forget_unless_sent_since(&mut self, actor_id: &ActorId, last_sent_ms: u64) {
            if self
                .entries
                .get(actor_id)
                .is_some_and(|e| e.2 <= last_sent_ms)
            {
                self.entries.remove(actor_id);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        NoteSent(u8),
        Remember(u8, i64),
        NoteSentAll,
        Stale(usize),
        /// Forget the `n`th key the last `Stale` returned.
        Forget(usize),
        Advance(u64),
        GoBack(u64),
    }

    /// Sequences of steps tried, each from its own seed.
    const SEQUENCES_COUNT: u64 = 2_000;
    const SEQUENCE_STEPS_MAX: usize = 200;

    fn step(rng: &mut ChaCha8Rng) -> Step {
        match rng.gen_range(0..17) {
            0..=3 => Step::NoteSent(rng.gen_range(0..12)),
            4..=5 => Step::Remember(rng.gen_range(0..12), rng.gen_range(1..4)),
            6 => Step::NoteSentAll,
            7..=9 => Step::Stale(rng.gen_range(1..5)),
            10..=11 => Step::Forget(rng.gen_range(0..4)),
            12..=15 => Step::Advance(rng.gen_range(0..1_500)),
            _ => Step::GoBack(rng.gen_range(0..1_500)),
        }
    }

    /// On a clock that only moves forward, the index finds exactly what the scan found, in the
    /// same order, with the same send times; with the clock going back, whatever it finds the
    /// scan counts as quiet too (a key created while the clock was behind a keepalive of every
    /// key counts that keepalive, which only defers a deletion).
    #[test]
    fn the_index_finds_what_a_scan_finds() {
        let mut found_total = 0;
        for seed in 0..SEQUENCES_COUNT {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let steps: Vec<Step> = (0..rng.gen_range(1..=SEQUENCE_STEPS_MAX))
                .map(|_| step(&mut rng))
                .collect();
            found_total += compare(&steps).unwrap_or_else(|failure| {
                panic!("sequence seed {seed}: {failure}\nsteps: {steps:?}")
            });
        }
        // The comparison is only worth something if the index found keys.
        assert!(found_total > SEQUENCES_COUNT, "found {found_total} keys");
    }

    /// Runs `steps` on the index and the scan; the number of keys found, or what differed.
    fn compare(steps: &[Step]) -> Result<u64, String> {
        let mut tracked = Tracked::new(LEASE_DURATION_MS);
        let mut scan = Scan::default();
        let mut now_ms = 5_000;
        let mut went_back = false;
        let mut last_stale = Vec::new();
        let mut found_total = 0;
        for (index, step) in steps.iter().cloned().enumerate() {
            let step_at_ms = now_ms;
            let at = || format!("step {index} ({step:?}) at {step_at_ms} ms");
            match step {
                Step::NoteSent(a) => {
                    tracked.note_sent(&actor(a), now_ms);
                    scan.note(&actor(a), now_ms, None);
                }
                Step::Remember(a, revision) => {
                    tracked.remember_acquired(&actor(a), revision, now_ms);
                    scan.note(&actor(a), now_ms, Some(revision));
                }
                Step::NoteSentAll => {
                    tracked.note_sent_all(now_ms);
                    scan.note_sent_all(now_ms);
                }
                Step::Stale(count) => {
                    let found = tracked.stale(now_ms, count);
                    let expected = scan.stale(now_ms, count);
                    found_total += found.len() as u64;
                    if went_back {
                        // Whatever the index finds, the scan counts as quiet too, and the
                        // send time it gives is no earlier. Which keys were looked at now
                        // differs, so the comparison ends here.
                        for (actor_id, last_sent_ms) in &found {
                            let scanned_ms = scan.entries[actor_id].2;
                            if scanned_ms + LEASE_DURATION_MS > now_ms || *last_sent_ms < scanned_ms
                            {
                                return Err(format!("{}: {actor_id} is not quiet", at()));
                            }
                        }
                        return Ok(found_total);
                    }
                    if found != expected {
                        return Err(format!("{}: found {found:?}, the scan {expected:?}", at()));
                    }
                    last_stale = found;
                }
                Step::Forget(n) => {
                    if let Some((actor_id, last_sent_ms)) = last_stale.get(n) {
                        tracked.forget_unless_sent_since(actor_id, *last_sent_ms);
                        scan.forget_unless_sent_since(actor_id, *last_sent_ms);
                    }
                }
                Step::Advance(ms) => now_ms += ms,
                Step::GoBack(ms) => {
                    went_back |= ms > 0;
                    now_ms -= ms.min(now_ms);
                }
            }
            if tracked.len() != scan.entries.len() {
                return Err(format!(
                    "{}: {} keys, the scan {}",
                    at(),
                    tracked.len(),
                    scan.entries.len()
                ));
            }
            for (actor_id, e) in &scan.entries {
                if tracked.acquired_at_ms(actor_id, e.0) != Some(e.1) {
                    return Err(format!("{}: {actor_id} acquired at another time", at()));
                }
                // The index's last send time is the scan's: nothing since it, something since
                // just before it.
                let same_last_sent = || {
                    tracked.nothing_sent_since(actor_id, e.2)
                        && !tracked.nothing_sent_since(actor_id, e.2 - 1)
                };
                if !went_back && !same_last_sent() {
                    return Err(format!("{}: {actor_id} last sent at another time", at()));
                }
            }
        }
        Ok(found_total)
    }

    /// A key nobody renews is found once a lease duration passed since its last request,
    /// then every other key quiet as long is found before it is found again.
    #[test]
    fn quiet_keys_are_found_in_turn_and_a_request_takes_one_out() {
        let mut tracked = Tracked::new(LEASE_DURATION_MS);
        for a in 0..3 {
            tracked.note_sent(&actor(a), 100);
        }
        assert_eq!(tracked.stale(1_099, 5), Vec::new());
        let found = tracked.stale(1_100, 2);
        assert_eq!(found, vec![(actor(0), 100), (actor(1), 100)]);
        // Only the one not looked at yet: the others were, less than a lease duration ago.
        assert_eq!(tracked.stale(1_200, 2), vec![(actor(2), 100)]);
        assert_eq!(tracked.stale(2_099, 5), Vec::new());
        // The ones looked at longest ago first, ties by actor id.
        assert_eq!(tracked.stale(2_100, 1), vec![(actor(0), 100)]);
        tracked.note_sent(&actor(1), 2_100);
        assert_eq!(tracked.stale(2_200, 5), vec![(actor(2), 100)]);
        // A request on every key makes none stale for a lease duration.
        tracked.note_sent_all(2_300);
        assert_eq!(tracked.stale(3_299, 5), Vec::new());
        // actor-1 was never looked at since it went quiet again.
        assert_eq!(tracked.stale(3_300, 1), vec![(actor(1), 2_300)]);
        // Nothing was sent since the time returned, so the key may be forgotten.
        tracked.forget_unless_sent_since(&actor(1), 2_300);
        assert_eq!(tracked.len(), 2);
        // A time before the latest request does not forget the key.
        tracked.forget_unless_sent_since(&actor(0), 2_299);
        assert_eq!(tracked.len(), 2);
    }

    /// After the clock goes back, keys that are no longer quiet by the new reading are not
    /// found, and are found again once it passes their lease duration.
    #[test]
    fn a_clock_going_back_unfinds_keys_quiet_only_by_the_old_reading() {
        let mut tracked = Tracked::new(LEASE_DURATION_MS);
        tracked.note_sent(&actor(0), 100);
        tracked.note_sent(&actor(1), 600);
        // Both are quiet at 1,700 (none taken, so none marked as looked at).
        assert_eq!(tracked.stale(1_700, 0), Vec::new());
        assert_eq!(tracked.stale(1_200, 5), vec![(actor(0), 100)]);
        assert_eq!(tracked.len(), 2);
        assert_eq!(tracked.stale(1_600, 5), vec![(actor(1), 600)]);
    }
}
