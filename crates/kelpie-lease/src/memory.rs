//! The in-memory store: a mutex around an insertion-ordered map.

use std::sync::Mutex;

use indexmap::IndexMap;
use kelpie_core::{ActorId, SharedClock};

use crate::error::StoreError;
use crate::lease::{LeaseRecord, LeaseRequest};
use crate::protocol::{assert_record_well_formed, decide, Decision};
use crate::store::{LeaseStore, RecordSnapshot, StoreSnapshot};

/// Lease records in process memory, timed by the given clock. The mutex is the atomic step:
/// the clock is read, the decision made and the record written while it is held.
///
/// `IndexMap` rather than `HashMap`: lookups are hashed, but iteration follows insertion
/// order, so a scan is deterministic inside the simulator.
pub struct MemoryLeaseStore {
    clock: SharedClock,
    records: Mutex<IndexMap<ActorId, LeaseRecord>>,
}

impl MemoryLeaseStore {
    /// An empty store whose expiry decisions use `clock`.
    pub fn new(clock: SharedClock) -> Self {
        Self {
            clock,
            records: Mutex::new(IndexMap::new()),
        }
    }

    /// An empty store with room for `capacity` actors.
    pub fn with_capacity(clock: SharedClock, capacity: usize) -> Self {
        Self {
            clock,
            records: Mutex::new(IndexMap::with_capacity(capacity)),
        }
    }

    fn apply_now(&self, actor_id: &ActorId, request: &LeaseRequest) -> Decision {
        let mut records = self
            .records
            .lock()
            .expect("lease store mutex poisoned by a panic");
        let store_now_ms = self.clock.now_ms();
        let slot = records.get_mut(actor_id);
        let decision = decide(actor_id, slot.as_deref(), request, store_now_ms);
        if let Some(written) = &decision.write {
            assert_record_well_formed(written);
            match slot {
                Some(record) => record.clone_from(written),
                None => {
                    records.insert(actor_id.clone(), written.clone());
                }
            }
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

    async fn load(&self, actor_id: &ActorId) -> Result<RecordSnapshot, StoreError> {
        let records = self
            .records
            .lock()
            .expect("lease store mutex poisoned by a panic");
        let record = records.get(actor_id).cloned();
        Ok(RecordSnapshot {
            record,
            store_now_ms: self.clock.now_ms(),
        })
    }

    async fn scan(&self) -> Result<StoreSnapshot, StoreError> {
        let records = self
            .records
            .lock()
            .expect("lease store mutex poisoned by a panic");
        let mut records: Vec<_> = records
            .iter()
            .map(|(a, r)| (a.clone(), r.clone()))
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(StoreSnapshot {
            records,
            store_now_ms: self.clock.now_ms(),
        })
    }
}
