//! The in-memory store: a mutex around a compact table of records.
//!
//! The store keeps, per actor, one 48-byte entry in a vector (the actor id and the record, with
//! its holder as a small number and its renewal count in 32 bits while it fits, in a side map
//! beyond) and one 4-byte slot in a hash index over that vector. Holders are few (one per node
//! process), so each distinct holder id is kept once, with a count of the records naming it,
//! and dropped when none does (but for the last one released). Every request still goes
//! through [`decide`], the one decision function every store applies: the entry is turned into
//! the [`LeaseRecord`] it stands for, decided on, and the record written back compactly.
//!
//! Records are never removed (a released lease keeps its token, so a later holder's is
//! larger), so entries only grow and an index into the vector stays valid.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hashbrown::HashTable;
use kelpie_core::{ActorId, FencingToken, NodeId, SharedClock};

use crate::error::{LeaseError, StoreError};
use crate::lease::{Lease, LeaseRecord, LeaseRequest};
use crate::protocol::{assert_record_well_formed, decide, Decision};
use crate::store::{LeaseStore, RecordSnapshot, StoreSnapshot};

/// Marks an entry with no holder (released).
const NO_HOLDER: u32 = u32::MAX;

/// Lease records in process memory, timed by the given clock. The mutex is the atomic step:
/// the clock is read, the decision made and the record written while it is held.
///
/// Lookups are hashed with a fixed seed, and iteration follows insertion order, so the store
/// behaves the same in every run, inside the simulator too.
pub struct MemoryLeaseStore {
    clock: SharedClock,
    table: Mutex<Table>,
}

/// One actor's record, compactly: what [`LeaseRecord`] holds, with the holder as an index
/// into [`Holders`].
struct Entry {
    actor_id: ActorId,
    fencing_token: FencingToken,
    acquired_at_ms: u64,
    expires_at_ms: u64,
    /// The renewal count, or [`RENEWALS_SPILLED`] when it is in [`Table::renewals_spilled`].
    renewal_count: u32,
    holder: u32,
}

/// Marks a renewal count too large for an entry: billions of renewals of one tenure.
const RENEWALS_SPILLED: u32 = u32::MAX;

/// Every holder id some record names, each kept once with the number of records naming it,
/// and the last one that no record names any more ([`Holders::idle`]).
#[derive(Default)]
struct Holders {
    slots: Vec<Option<(NodeId, u64)>>,
    index: HashTable<u32>,
    free: Vec<u32>,
    /// The slot of the holder whose last record was released most recently, still indexed
    /// with a count of zero. A node that releases its only lease and acquires again (the
    /// common case for a node with one active actor, or one that cycles through actors) then
    /// finds its id without hashing it and without forgetting and re-interning it each time.
    /// One idle holder at most, so the holders kept stay bounded by the live ones plus one.
    idle: Option<u32>,
}

#[derive(Default)]
struct Table {
    entries: Vec<Entry>,
    /// Entry positions, hashed by actor id.
    index: HashTable<u32>,
    holders: Holders,
    /// Renewal counts that do not fit an entry, by entry index.
    renewals_spilled: BTreeMap<usize, u64>,
    /// The record a request is decided on, rebuilt here from its entry ([`Table::lend`]).
    decided: DecidedRecords,
}

/// Two records kept to lend to [`decide`], one with a holder and one without, overwritten
/// for each request. Building a fresh [`LeaseRecord`] clones the holder id (an atomic
/// increment, and a decrement when it is dropped) on every request; here the id is cloned
/// only when the holder differs from the last one lent, which for a node renewing or
/// releasing its own leases is never. Each keeps at most one holder id alive beyond the table.
struct DecidedRecords {
    held: LeaseRecord,
    free: LeaseRecord,
}

impl Default for DecidedRecords {
    fn default() -> Self {
        let blank = LeaseRecord {
            holder: None,
            fencing_token: FencingToken::ZERO,
            acquired_at_ms: 0,
            expires_at_ms: 0,
            renewal_count: 0,
        };
        Self {
            held: blank.clone(),
            free: blank,
        }
    }
}

/// The hash seed: fixed, so the table behaves the same in every process ("kelpie").
const HASH_SEED: u64 = u64::from_be_bytes(*b"\0\0kelpie");

fn hash_str(id: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(HASH_SEED).hash_one(id)
}

impl Holders {
    fn get(&self, slot: u32) -> Option<&NodeId> {
        if slot == NO_HOLDER {
            return None;
        }
        let (node_id, _) = self.slots[slot as usize]
            .as_ref()
            .expect("a live holder slot");
        Some(node_id)
    }

    /// The slot of `node_id`, counting one more record naming it.
    fn retain(&mut self, node_id: &NodeId) -> u32 {
        if let Some(idle) = self.idle {
            let (idle_id, count) = self.slots[idle as usize].as_mut().expect("an idle slot");
            if idle_id == node_id {
                *count = 1;
                self.idle = None;
                return idle;
            }
        }
        let hash = hash_str(node_id.as_str());
        let slots = &self.slots;
        let found = self.index.find(hash, |&s| {
            slots[s as usize]
                .as_ref()
                .is_some_and(|(n, _)| n == node_id)
        });
        if let Some(&slot) = found {
            let (_, count) = self.slots[slot as usize].as_mut().expect("indexed slot");
            *count += 1;
            debug_assert!(self.idle != Some(slot), "the idle holder was checked above");
            return slot;
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = u32::try_from(self.slots.len()).expect("fewer than 2^32 holders");
                assert!(slot != NO_HOLDER, "holder slots exhausted");
                self.slots.push(None);
                slot
            }
        };
        self.slots[slot as usize] = Some((node_id.clone(), 1));
        let slots = &self.slots;
        self.index.insert_unique(hash, slot, |&s| {
            hash_str(slots[s as usize].as_ref().expect("indexed").0.as_str())
        });
        slot
    }

    /// One record fewer names the holder in `slot`. When none does, it becomes the idle
    /// holder, and the one idle before it is forgotten.
    fn release(&mut self, slot: u32) {
        if slot == NO_HOLDER {
            return;
        }
        let (_, count) = self.slots[slot as usize]
            .as_mut()
            .expect("a live holder slot");
        *count -= 1;
        if *count > 0 {
            return;
        }
        if let Some(idle) = self.idle.replace(slot) {
            self.forget(idle);
        }
    }

    /// Forgets the holder in `slot`, which no record names.
    fn forget(&mut self, slot: u32) {
        let (node_id, count) = self.slots[slot as usize]
            .as_ref()
            .expect("a live holder slot");
        assert_eq!(*count, 0, "only a holder no record names is forgotten");
        let hash = hash_str(node_id.as_str());
        if let Ok(found) = self.index.find_entry(hash, |&s| s == slot) {
            found.remove();
        }
        self.slots[slot as usize] = None;
        self.free.push(slot);
    }
}

/// Where a request's actor is in the table: its entry, or the hash to index a new one by
/// (so the id is hashed once per request).
#[derive(Clone, Copy)]
enum Found {
    At(usize),
    Absent { hash: u64 },
}

impl Found {
    fn at(self) -> Option<usize> {
        match self {
            Found::At(i) => Some(i),
            Found::Absent { .. } => None,
        }
    }
}

impl Table {
    /// The entry of `actor_id`, whose hash is `hash` (taken outside the lock).
    fn find(&self, actor_id: &ActorId, hash: u64) -> Found {
        let entries = &self.entries;
        match self
            .index
            .find(hash, |&i| entries[i as usize].actor_id == *actor_id)
        {
            Some(&i) => Found::At(i as usize),
            None => Found::Absent { hash },
        }
    }

    fn record(&self, at: usize) -> LeaseRecord {
        let entry = &self.entries[at];
        let renewal_count = match entry.renewal_count {
            RENEWALS_SPILLED => self.renewals_spilled[&at],
            count => u64::from(count),
        };
        LeaseRecord {
            holder: self.holders.get(entry.holder).cloned(),
            fencing_token: entry.fencing_token,
            acquired_at_ms: entry.acquired_at_ms,
            expires_at_ms: entry.expires_at_ms,
            renewal_count,
        }
    }

    /// The record at entry `at`, as [`Table::record`] builds it, in one of the
    /// [`DecidedRecords`] and lent from there.
    fn lend(&mut self, at: usize) -> &LeaseRecord {
        let entry = &self.entries[at];
        let renewal_count = match entry.renewal_count {
            RENEWALS_SPILLED => self.renewals_spilled[&at],
            count => u64::from(count),
        };
        let lent = match self.holders.get(entry.holder) {
            None => &mut self.decided.free,
            Some(holder) => {
                let lent = &mut self.decided.held;
                if lent.holder.as_ref() != Some(holder) {
                    lent.holder = Some(holder.clone());
                }
                lent
            }
        };
        lent.fencing_token = entry.fencing_token;
        lent.acquired_at_ms = entry.acquired_at_ms;
        lent.expires_at_ms = entry.expires_at_ms;
        lent.renewal_count = renewal_count;
        lent
    }

    /// `count` as an entry of index `at` keeps it.
    fn renewal_count_at(&mut self, at: usize, count: u64) -> u32 {
        match u32::try_from(count) {
            Ok(count) if count != RENEWALS_SPILLED => {
                // The map is empty but for billions of renewals of one tenure: skip the call.
                if !self.renewals_spilled.is_empty() {
                    self.renewals_spilled.remove(&at);
                }
                count
            }
            _ => {
                self.renewals_spilled.insert(at, count);
                RENEWALS_SPILLED
            }
        }
    }

    /// Writes `record` for `actor_id`, at its entry if it has one.
    fn write(&mut self, actor_id: &ActorId, found: Found, record: &LeaseRecord) {
        let at = found.at();
        let old_holder = at.map_or(NO_HOLDER, |i| self.entries[i].holder);
        let holder = match &record.holder {
            // The same holder as before (a renewal, a refreshed acquire): no lookup.
            Some(node_id) if self.holders.get(old_holder) == Some(node_id) => old_holder,
            Some(node_id) => {
                let slot = self.holders.retain(node_id);
                self.holders.release(old_holder);
                slot
            }
            None => {
                self.holders.release(old_holder);
                NO_HOLDER
            }
        };
        let i = at.unwrap_or(self.entries.len());
        let renewal_count = self.renewal_count_at(i, record.renewal_count);
        match at {
            Some(i) => {
                // The stored id is kept: it equals `actor_id`, and one copy is enough.
                let entry = &mut self.entries[i];
                entry.fencing_token = record.fencing_token;
                entry.acquired_at_ms = record.acquired_at_ms;
                entry.expires_at_ms = record.expires_at_ms;
                entry.renewal_count = renewal_count;
                entry.holder = holder;
            }
            None => {
                let Found::Absent { hash } = found else {
                    unreachable!("an entry that was found has a position")
                };
                let i = u32::try_from(self.entries.len()).expect("fewer than 2^32 actors");
                let entries = &self.entries;
                self.index.insert_unique(hash, i, |&j| {
                    hash_str(entries[j as usize].actor_id.as_str())
                });
                self.entries.push(Entry {
                    actor_id: actor_id.clone(),
                    fencing_token: record.fencing_token,
                    acquired_at_ms: record.acquired_at_ms,
                    expires_at_ms: record.expires_at_ms,
                    renewal_count,
                    holder,
                });
            }
        }
    }
}

impl MemoryLeaseStore {
    /// An empty store whose expiry decisions use `clock`.
    pub fn new(clock: SharedClock) -> Self {
        Self {
            clock,
            table: Mutex::new(Table::default()),
        }
    }

    /// An empty store with room for `capacity` actors.
    pub fn with_capacity(clock: SharedClock, capacity: usize) -> Self {
        let table = Table {
            entries: Vec::with_capacity(capacity),
            index: HashTable::with_capacity(capacity),
            holders: Holders::default(),
            renewals_spilled: BTreeMap::new(),
            decided: DecidedRecords::default(),
        };
        Self {
            clock,
            table: Mutex::new(table),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .expect("lease store mutex poisoned by a panic")
    }

    #[inline]
    fn apply_now(&self, actor_id: &ActorId, request: &LeaseRequest) -> Decision {
        // Hashing needs no lock; the lock is held only for what must be one atomic step.
        let hash = hash_str(actor_id.as_str());
        let mut table = self.lock();
        let store_now_ms = self.clock.now_ms();
        let found = table.find(actor_id, hash);
        let record = found.at().map(|at| table.lend(at));
        let decision = decide(actor_id, record, request, store_now_ms);
        if let Some(written) = &decision.write {
            assert_record_well_formed(written);
            table.write(actor_id, found, written);
        }
        decision
    }
}

impl LeaseStore for MemoryLeaseStore {
    async fn apply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> Result<Decision, StoreError> {
        Ok(self.apply_now(actor_id, request))
    }

    async fn apply_reply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> Result<Result<Lease, LeaseError>, StoreError> {
        Ok(self.apply_now(actor_id, request).reply)
    }

    async fn load(&self, actor_id: &ActorId) -> Result<RecordSnapshot, StoreError> {
        let hash = hash_str(actor_id.as_str());
        let table = self.lock();
        let record = table.find(actor_id, hash).at().map(|i| table.record(i));
        Ok(RecordSnapshot {
            record,
            store_now_ms: self.clock.now_ms(),
        })
    }

    async fn scan(&self) -> Result<StoreSnapshot, StoreError> {
        let table = self.lock();
        let mut records: Vec<_> = table
            .entries
            .iter()
            .enumerate()
            .map(|(i, entry)| (entry.actor_id.clone(), table.record(i)))
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(StoreSnapshot {
            records,
            store_now_ms: self.clock.now_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseOp;
    use crate::test_support::ready;
    use kelpie_core::ManualClock;
    use std::sync::Arc;

    /// Holder ids are kept once each, and forgotten once no record names them (but for the one
    /// released last, kept idle): a store that sees many short-lived holders (restarted
    /// processes) does not grow with them.
    #[test]
    fn holders_are_shared_and_forgotten_when_no_record_names_them() {
        let clock = ManualClock::new(0);
        let store = MemoryLeaseStore::new(Arc::new(clock.clone()));
        let actors: Vec<ActorId> = (0..4)
            .map(|i| ActorId::new(format!("a{i}")).unwrap())
            .collect();
        for round in 0..50u64 {
            let node = NodeId::new(format!("n@{round}")).unwrap();
            for actor in &actors {
                let acquire = LeaseRequest::new(LeaseOp::Acquire, node.clone(), 100);
                let granted = ready(store.apply(actor, &acquire)).unwrap();
                assert_eq!(granted.reply.unwrap().holder, node);
            }
            let indexed = store.lock().holders.index.len();
            let idle = usize::from(round > 0);
            assert_eq!(indexed, 1 + idle, "one live holder, and the last one idle");
            for actor in &actors {
                let mut release = LeaseRequest::new(LeaseOp::Release, node.clone(), 100);
                release.fencing_token = Some(FencingToken(round + 1));
                ready(store.apply(actor, &release)).unwrap().reply.unwrap();
            }
            let table = store.lock();
            assert_eq!(
                table.holders.index.len(),
                1,
                "released: only the idle holder"
            );
            let idle = table
                .holders
                .idle
                .expect("the last holder released is idle");
            let (idle_id, count) = table.holders.slots[idle as usize].as_ref().unwrap();
            assert_eq!((idle_id, *count), (&node, 0));
        }
        let table = store.lock();
        assert!(table.holders.slots.len() <= 2, "slots are reused");
        assert_eq!(table.entries.len(), actors.len());
        let record = table.record(0);
        assert_eq!(
            (record.holder, record.fencing_token),
            (None, FencingToken(50))
        );
    }

    /// The record lent to the decision is the entry's, whoever holds it, after any other.
    #[test]
    fn lent_records_are_the_entries_records() {
        let mut table = Table::default();
        let actors: Vec<ActorId> = (0..2)
            .map(|i| ActorId::new(format!("a{i}")).unwrap())
            .collect();
        let holders = [
            Some(NodeId::new("n1").unwrap()),
            Some(NodeId::new("n2").unwrap()),
            None,
            Some(NodeId::new("n1").unwrap()),
        ];
        for (round, holder) in (0u64..).zip(holders.iter().cycle().take(12)) {
            let at = (round % 2) as usize;
            let actor = &actors[at];
            let record = LeaseRecord {
                holder: holder.clone(),
                fencing_token: FencingToken(round + 1),
                acquired_at_ms: round,
                expires_at_ms: round + 10,
                renewal_count: round * 3,
            };
            let found = table.find(actor, hash_str(actor.as_str()));
            table.write(actor, found, &record);
            for other in 0..table.entries.len() {
                let built = table.record(other);
                assert_eq!(table.lend(other), &built);
            }
            assert_eq!(table.lend(at), &record);
        }
    }

    /// A renewal count beyond 32 bits is kept exactly, beside the entry, and comes back.
    #[test]
    fn renewal_counts_beyond_32_bits_are_kept_exactly() {
        let mut table = Table::default();
        let actor = ActorId::new("a").unwrap();
        let mut record = LeaseRecord {
            holder: Some(NodeId::new("n").unwrap()),
            fencing_token: FencingToken(1),
            acquired_at_ms: 1,
            expires_at_ms: 2,
            renewal_count: u64::from(u32::MAX) + 7,
        };
        let found = table.find(&actor, hash_str(actor.as_str()));
        table.write(&actor, found, &record);
        assert_eq!(table.record(0), record);
        assert_eq!(table.lend(0), &record);
        record.renewal_count = 3;
        let found = table.find(&actor, hash_str(actor.as_str()));
        assert!(matches!(found, Found::At(0)));
        table.write(&actor, found, &record);
        assert_eq!(table.record(0), record);
        assert_eq!(table.lend(0), &record);
        assert!(table.renewals_spilled.is_empty());
        assert_eq!(std::mem::size_of::<Entry>(), 48);
    }
}
