//! The storage side of the protocol.
//!
//! A [`LeaseStore`] keeps one [`LeaseRecord`] per actor and applies a request to it in one
//! linearizable step: read the record and the store's clock, call the protocol's pure
//! [`decide`](crate::backend::decide), and write its result only if the record is still the one that was read
//! (versioned compare-and-swap, or a lock or transaction that makes it so). Stores stay thin:
//! they never decide anything themselves, and each store calls the decision function itself:
//! a caller cannot hand it another protocol.

use std::future::Future;

use kelpie_core::ActorId;

use crate::error::{LeaseError, StoreError};
use crate::lease::{Lease, LeaseRecord, LeaseRequest};
use crate::protocol::Decision;

/// How many times a store retries a compare-and-swap that lost a race before giving up
/// with [`StoreError::Contention`].
pub const STORE_CONFLICT_RETRIES_MAX: u32 = 64;

/// The store's view of one actor at one instant of its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSnapshot {
    /// The stored record, if the actor was ever leased.
    pub record: Option<LeaseRecord>,
    /// The store's clock when it was read.
    pub store_now_ms: u64,
}

/// Every record in a store at one instant of its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSnapshot {
    /// Records in actor id order.
    pub records: Vec<(ActorId, LeaseRecord)>,
    /// The store's clock when they were read.
    pub store_now_ms: u64,
}

/// Durable (or simulated) storage of lease records with an atomic decide-and-write step.
pub trait LeaseStore: Send + Sync {
    /// Applies `request` to the actor's record in one linearizable step: reads the record and
    /// the store clock, calls [`decide`](crate::backend::decide), writes `Decision::write` if present,
    /// and returns the
    /// decision. An `Err` means the store failed; [`StoreError::CommitUnknown`] means the
    /// write may have been applied.
    fn apply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send;

    /// [`apply`](Self::apply), answering only the decision's reply: what a
    /// [`LeaseManager`](crate::LeaseManager) hands its caller. A store that decides in process
    /// overrides it to drop the written record where it wrote it, rather than hand it back.
    fn apply_reply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> impl Future<Output = Result<Result<Lease, LeaseError>, StoreError>> + Send {
        async move { Ok(self.apply(actor_id, request).await?.reply) }
    }

    /// [`apply_reply`](Self::apply_reply) of each request, all at once, with their outcomes
    /// in the order of `requests`. Each is applied in its own atomic step, as its own call
    /// would be; a store may carry them together (one message, one lock). The default awaits
    /// each request's own call, all at once.
    fn apply_replies(
        &self,
        requests: Vec<(ActorId, LeaseRequest)>,
    ) -> impl Future<Output = Vec<Result<Result<Lease, LeaseError>, StoreError>>> + Send {
        async move {
            let calls = requests
                .iter()
                .map(|(actor_id, request)| self.apply_reply(actor_id, request));
            crate::join::join_in_order(calls).await
        }
    }

    /// Reads one actor's record with the store's clock.
    fn load(
        &self,
        actor_id: &ActorId,
    ) -> impl Future<Output = Result<RecordSnapshot, StoreError>> + Send;

    /// Reads every record with the store's clock.
    fn scan(&self) -> impl Future<Output = Result<StoreSnapshot, StoreError>> + Send;
}
