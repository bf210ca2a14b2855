//! Fast handover: waiting for an actor's lease to become free with an etcd watch, so that a
//! contender acquires right after a release instead of polling.

use kelpie_core::{ActorId, NodeId};

use super::api::EtcdApi;
use super::errors::{store_error, within, Effect};
use super::ops::single_key;
use super::EtcdLeaseManager;
use crate::error::{LeaseError, StoreError};
use crate::lease::Lease;
use crate::manager::LeaseManager;

/// How many watches in a row may fail (a member restarting, a leader change) before
/// [`EtcdLeaseManager::wait_until_free`] gives up with the last error.
pub const ETCD_WATCH_FAILURES_MAX: u32 = 8;

impl<A: EtcdApi> EtcdLeaseManager<A> {
    /// Waits until nobody holds the lease on `actor_id` (its key is deleted by a release or by
    /// etcd at expiry), for at most `max_wait_ms`. Returns `Ok(true)` once it is free (at once
    /// if it already is), `Ok(false)` if it was still held when the time ran out. The lease may
    /// of course be taken by someone else before the caller acquires it.
    pub async fn wait_until_free(
        &self,
        actor_id: &ActorId,
        max_wait_ms: u64,
    ) -> Result<bool, StoreError> {
        let key = self.keys.actor_key(actor_id);
        let waiting = self.watch_until_deleted(&key);
        match within(&self.connection.clock, max_wait_ms, waiting).await {
            Some(Ok(())) => {
                self.watched_free(actor_id);
                Ok(true)
            }
            Some(Err(error)) => Err(error),
            None => Ok(false),
        }
    }

    /// Acquires the lease on `actor_id`, waiting up to `max_wait_ms` (on the manager's clock)
    /// for its holder to release it, or for it to expire, if it is held. The limit bounds the
    /// waiting; each acquire attempt is bounded by the request timeout. Fails with the last
    /// `HeldByOther` if the lease is still held when the time runs out.
    pub async fn acquire_waiting(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        max_wait_ms: u64,
    ) -> Result<Lease, LeaseError> {
        let clock = &self.connection.clock;
        let deadline_ms = clock.now_ms().saturating_add(max_wait_ms);
        loop {
            match self.acquire(actor_id, node_id).await {
                Err(error @ LeaseError::HeldByOther { .. }) => {
                    let remaining_ms = deadline_ms.saturating_sub(clock.now_ms());
                    if remaining_ms == 0 || !self.wait_until_free(actor_id, remaining_ms).await? {
                        return Err(error);
                    }
                }
                other => return other,
            }
        }
    }

    /// Returns once `key` is absent. Reads it, and if present watches for its deletion from the
    /// revision after the read, so a delete between the read and the watch is not missed.
    async fn watch_until_deleted(&self, key: &[u8]) -> Result<(), StoreError> {
        let mut failures = 0;
        loop {
            let Some(read_revision) = self.revision_if_present(key).await? else {
                return Ok(());
            };
            match self.watch_for_delete(key, read_revision + 1).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    failures += 1;
                    if failures >= ETCD_WATCH_FAILURES_MAX {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// The revision at which `key` was read, if it exists.
    async fn revision_if_present(&self, key: &[u8]) -> Result<Option<i64>, StoreError> {
        let reading = self.connection.api.range(single_key(key));
        let reply = self
            .bounded("reading a lease", Effect::ReadOnly, reading)
            .await?;
        if reply.kvs.is_empty() {
            return Ok(None);
        }
        Ok(Some(reply.revision))
    }

    /// Watches `key` from `start_revision` until a delete event arrives. No timeout here: a
    /// held lease may stay held for long, and the caller's limit bounds the wait. A watch
    /// whose start revision was compacted away fails, and the caller reads again.
    async fn watch_for_delete(&self, key: &[u8], start_revision: i64) -> Result<(), StoreError> {
        match self.connection.api.watch_delete(key, start_revision).await {
            Ok(_revision) => {
                kelpie_core::coverage::mark(super::MARK_ETCD_HANDOVER_BY_WATCH);
                Ok(())
            }
            Err(error) => Err(store_error("watching", Effect::ReadOnly, &error)),
        }
    }
}
