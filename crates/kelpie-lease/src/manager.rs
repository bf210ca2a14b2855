//! The [`LeaseManager`] trait and its one implementation over any [`LeaseStore`].

use std::future::Future;

use kelpie_core::{ActorId, FencingToken, NodeId, SharedClock};

use crate::error::{LeaseError, StoreError};
use crate::join::join_in_order;
use crate::lease::{FencedOp, FencedRequest, Lease, LeaseConfig, LeaseOp, LeaseRequest};
use crate::memory::MemoryLeaseStore;
use crate::store::LeaseStore;

/// What a node can do with leases. The conformance suite (`tests/conformance.rs`) holds every
/// backend to the same answers, except in who counts as the holder of a lease:
///
/// - On the protocol's stores ([`MemoryLeaseManager`], [`SqliteLeaseManager`]), the holder is
///   the [`NodeId`] alone: every caller naming it, through any manager or process, is the
///   holder. Its acquire of a lease it holds keeps the fencing token, and it may renew and
///   release the lease.
/// - On etcd ([`EtcdLeaseManager`]), the holder is the node id *and* the manager's etcd
///   session. An acquire under the same node id through another manager (a previous
///   incarnation of the node), or through this one after etcd expired the session the key
///   hangs off, deletes the lease's key and creates it again: the caller gets a new, larger
///   token, and renewals through the old session are refused. A release without a token
///   still needs only the node id.
///
/// # One node id per process lifetime
///
/// So on SQLite and memory, two processes that use a manager directly with the same node id (a
/// paused old process and the restarted process that replaced it, say) share one lease and
/// one fencing token, and a fenced resource cannot tell their writes apart. Give each process
/// lifetime its own node id when you call a manager directly. [`LeaseSession`] and
/// [`LeaseKeeper`] do it for you: they hold leases as `<node id>@<incarnation>`
/// ([`LeaseKeeper::holder_id`]), with an incarnation drawn at random when they are built, so a
/// restarted process is a new holder and gets a larger token on every backend.
///
/// [`SqliteLeaseManager`]: crate::SqliteLeaseManager
/// [`EtcdLeaseManager`]: crate::EtcdLeaseManager
/// [`LeaseSession`]: crate::LeaseSession
/// [`LeaseKeeper`]: crate::LeaseKeeper
/// [`LeaseKeeper::holder_id`]: crate::LeaseKeeper::holder_id
pub trait LeaseManager: Send + Sync {
    /// The duration of every lease this manager grants or renews. A keeper reads it from here,
    /// so the node's belief and the store's grant are measured against one duration.
    fn lease_duration_ms(&self) -> u64;

    /// Takes the lease on a free or expired actor with a fencing token larger than any issued
    /// for it before; refuses with [`LeaseError::HeldByOther`] while another holder's lease
    /// is valid.
    ///
    /// If `node_id` already holds a valid lease on the actor (a retry after a lost reply, say),
    /// the lease is granted again with its expiry refreshed as a renewal would refresh it. Its
    /// fencing token is kept on memory and SQLite, and on etcd while the lease hangs off this
    /// manager's current session; otherwise etcd re-creates the lease with a larger token (see
    /// the trait's documentation, which also says why each process lifetime needs its own
    /// node id).
    fn acquire(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
    ) -> impl Future<Output = Result<Lease, LeaseError>> + Send;

    /// Extends the caller's unexpired lease by the configured duration; the token is kept.
    fn renew(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
    ) -> impl Future<Output = Result<Lease, LeaseError>> + Send;

    /// Gives up the caller's lease; returns the lease as it was.
    fn release(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
    ) -> impl Future<Output = Result<Lease, LeaseError>> + Send;

    /// Renews only if the caller's lease still carries `fencing_token`.
    ///
    /// The default checks the token with [`get`](Self::get) before renewing, which is not
    /// atomic; backends override it with a check inside their atomic step.
    fn renew_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> impl Future<Output = Result<Lease, LeaseError>> + Send {
        async move {
            check_token(self.get(actor_id).await?, actor_id, node_id, fencing_token)?;
            self.renew(actor_id, node_id).await
        }
    }

    /// Releases only if the caller's lease still carries `fencing_token`, so a delayed release
    /// from an earlier tenure cannot free a later one. The default is not atomic, as for
    /// [`renew_fenced`](Self::renew_fenced).
    fn release_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> impl Future<Output = Result<Lease, LeaseError>> + Send {
        async move {
            check_token(self.get(actor_id).await?, actor_id, node_id, fencing_token)?;
            self.release(actor_id, node_id).await
        }
    }

    /// [`renew_fenced`](Self::renew_fenced) or [`release_fenced`](Self::release_fenced) of
    /// each request, all at once, with their outcomes in the order of `requests`: a
    /// [`LeaseKeeper`](crate::LeaseKeeper)'s round. Each request is decided on its own, as its
    /// own call would be (one may be granted while another is refused or fails); only how they
    /// travel differs. The default awaits each request's own call, all at once; the protocol's
    /// managers hand the round to their store whole ([`LeaseStore::apply_replies`]). A wrapper
    /// that adds to `renew_fenced` or `release_fenced` (metrics, say) and forwards this method
    /// to the manager it wraps skips its additions for rounds: leave it the default, or add
    /// them here too. Answering with fewer or more outcomes than requests is a bug (the keeper
    /// panics).
    fn fenced_round(
        &self,
        node_id: &NodeId,
        requests: &[FencedRequest],
    ) -> impl Future<Output = Vec<Result<Lease, LeaseError>>> + Send {
        join_in_order(requests.iter().map(move |request| async move {
            let (actor_id, token) = (&request.actor_id, request.fencing_token);
            match request.op {
                FencedOp::Renew => self.renew_fenced(actor_id, node_id, token).await,
                FencedOp::Release => self.release_fenced(actor_id, node_id, token).await,
            }
        }))
    }

    /// Whether `node_id` holds a valid lease on the actor, on the store's clock.
    fn is_valid(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
    ) -> impl Future<Output = Result<bool, LeaseError>> + Send;

    /// The valid lease on the actor, if any.
    fn get(
        &self,
        actor_id: &ActorId,
    ) -> impl Future<Output = Result<Option<Lease>, LeaseError>> + Send;

    /// The valid leases `node_id` holds, in actor id order.
    fn leases_held_by(
        &self,
        node_id: &NodeId,
    ) -> impl Future<Output = Result<Vec<Lease>, LeaseError>> + Send;

    /// Waits, where the store can tell without polling (a watch), until nobody holds the
    /// lease on `actor_id`, for at most `max_wait_ms`: `Ok(Some(true))` once it is free (at
    /// once if it is), `Ok(Some(false))` if it was still held when the time ran out. Stores
    /// that cannot watch answer `Ok(None)` at once (the default), and the caller polls.
    /// [`LeaseSession::campaign`](crate::LeaseSession::campaign) uses it between attempts.
    fn watch_until_free(
        &self,
        actor_id: &ActorId,
        max_wait_ms: u64,
    ) -> impl Future<Output = Result<Option<bool>, LeaseError>> + Send {
        let _ = (actor_id, max_wait_ms);
        async { Ok(None) }
    }
}

fn check_token(
    lease: Option<Lease>,
    actor_id: &ActorId,
    node_id: &NodeId,
    fencing_token: FencingToken,
) -> Result<(), LeaseError> {
    match lease {
        Some(lease) if lease.holder == *node_id && lease.fencing_token == fencing_token => Ok(()),
        other => Err(LeaseError::NotHolder {
            actor_id: actor_id.clone(),
            node_id: node_id.clone(),
            holder: other.map(|lease| lease.holder),
        }),
    }
}

/// The lease protocol over a store: acquire, renew and release (fenced or not) are each one
/// [`LeaseStore::apply_reply`], in which the store runs the protocol's decision function
/// ([`decide`](crate::backend::decide)) in its atomic step; the reads are one
/// [`LeaseStore::load`] or [`LeaseStore::scan`].
pub struct ProtocolLeaseManager<S> {
    store: S,
    config: LeaseConfig,
}

/// The protocol over the in-memory store.
pub type MemoryLeaseManager = ProtocolLeaseManager<MemoryLeaseStore>;

impl MemoryLeaseManager {
    /// A manager over a new in-memory store timed by `clock`.
    pub fn in_memory(clock: SharedClock, config: LeaseConfig) -> Self {
        Self::new(MemoryLeaseStore::new(clock), config)
    }
}

impl<S: LeaseStore> ProtocolLeaseManager<S> {
    /// The protocol over `store`.
    pub fn new(store: S, config: LeaseConfig) -> Self {
        Self { store, config }
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The lease settings.
    pub fn config(&self) -> LeaseConfig {
        self.config
    }

    async fn request(
        &self,
        op: LeaseOp,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: Option<FencingToken>,
    ) -> Result<Lease, LeaseError> {
        let request = self.lease_request(op, node_id, fencing_token);
        reply_of(self.store.apply_reply(actor_id, &request).await)
    }

    /// A request of `node_id` with the configured duration.
    fn lease_request(
        &self,
        op: LeaseOp,
        node_id: &NodeId,
        fencing_token: Option<FencingToken>,
    ) -> LeaseRequest {
        LeaseRequest {
            op,
            node_id: node_id.clone(),
            lease_duration_ms: self.config.lease_duration_ms,
            fencing_token,
        }
    }
}

/// The caller's answer to a request: the store's reply, or its failure as a lease error.
fn reply_of(outcome: Result<Result<Lease, LeaseError>, StoreError>) -> Result<Lease, LeaseError> {
    match outcome {
        Ok(reply) => reply,
        Err(error) => Err(error.into()),
    }
}

impl<S: LeaseStore> LeaseManager for ProtocolLeaseManager<S> {
    fn lease_duration_ms(&self) -> u64 {
        self.config.lease_duration_ms
    }

    async fn acquire(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.request(LeaseOp::Acquire, actor_id, node_id, None)
            .await
    }

    async fn renew(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.request(LeaseOp::Renew, actor_id, node_id, None).await
    }

    async fn release(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.request(LeaseOp::Release, actor_id, node_id, None)
            .await
    }

    async fn renew_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        self.request(LeaseOp::Renew, actor_id, node_id, Some(fencing_token))
            .await
    }

    async fn release_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        self.request(LeaseOp::Release, actor_id, node_id, Some(fencing_token))
            .await
    }

    /// The round goes to the store as one batch, each request decided on its own.
    async fn fenced_round(
        &self,
        node_id: &NodeId,
        requests: &[FencedRequest],
    ) -> Vec<Result<Lease, LeaseError>> {
        let batch = requests
            .iter()
            .map(|request| {
                let token = Some(request.fencing_token);
                let lease_request = self.lease_request(request.op.into(), node_id, token);
                (request.actor_id.clone(), lease_request)
            })
            .collect();
        let outcomes = self.store.apply_replies(batch).await;
        assert_eq!(
            outcomes.len(),
            requests.len(),
            "one outcome per request of a round"
        );
        outcomes.into_iter().map(reply_of).collect()
    }

    async fn is_valid(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<bool, LeaseError> {
        let snapshot = self.store.load(actor_id).await?;
        let holder = snapshot
            .record
            .as_ref()
            .and_then(|r| r.valid_holder(snapshot.store_now_ms));
        Ok(holder == Some(node_id))
    }

    async fn get(&self, actor_id: &ActorId) -> Result<Option<Lease>, LeaseError> {
        let snapshot = self.store.load(actor_id).await?;
        let now_ms = snapshot.store_now_ms;
        Ok(snapshot
            .record
            .and_then(|r| r.lease(actor_id))
            .filter(|l| l.is_valid_at(now_ms)))
    }

    async fn leases_held_by(&self, node_id: &NodeId) -> Result<Vec<Lease>, LeaseError> {
        let snapshot = self.store.scan().await?;
        let now_ms = snapshot.store_now_ms;
        let held = snapshot
            .records
            .iter()
            .filter(|(_, r)| r.valid_holder(now_ms) == Some(node_id))
            .filter_map(|(actor_id, r)| r.lease(actor_id))
            .collect();
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::ready;
    use kelpie_core::ManualClock;
    use std::sync::Arc;

    /// The node id kept between requests is used only for the same node: nodes taking turns
    /// on one thread each get their own leases, refusals and releases.
    #[test]
    fn each_request_asks_as_its_own_node() {
        let leases = MemoryLeaseManager::in_memory(
            Arc::new(ManualClock::new(0)),
            LeaseConfig::new(1_000).unwrap(),
        );
        let nodes: Vec<NodeId> = ["n1", "n2", "n1", "n3"]
            .iter()
            .map(|n| NodeId::new(*n).unwrap())
            .collect();
        let actors: Vec<ActorId> = (0..nodes.len())
            .map(|i| ActorId::new(format!("a{i}")).unwrap())
            .collect();
        for (actor, node) in actors.iter().zip(&nodes) {
            let lease = ready(leases.acquire(actor, node)).unwrap();
            assert_eq!(&lease.holder, node);
            for other in nodes.iter().filter(|other| *other != node) {
                let refused = ready(leases.renew(actor, other)).unwrap_err();
                assert!(
                    matches!(refused, LeaseError::NotHolder { .. }),
                    "{refused:?}"
                );
            }
            assert_eq!(&ready(leases.renew(actor, node)).unwrap().holder, node);
        }
        for (actor, node) in actors.iter().zip(&nodes).rev() {
            assert_eq!(&ready(leases.release(actor, node)).unwrap().holder, node);
        }
    }
}
