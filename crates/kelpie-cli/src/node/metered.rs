//! A [`LeaseManager`] that times renewals for the node's latency histogram and passes every
//! call through unchanged.

use std::sync::Arc;

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::{Lease, LeaseError, LeaseManager};

use super::metrics::Metrics;

/// `inner`, with each renewal's round trip recorded in `metrics`.
pub struct MeteredManager<M> {
    inner: M,
    metrics: Arc<Metrics>,
}

impl<M> MeteredManager<M> {
    /// Wraps `inner`.
    pub fn new(inner: M, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

/// The real monotonic clock: a node is a real process, never run inside the simulator.
#[allow(clippy::disallowed_methods)]
fn started() -> std::time::Instant {
    std::time::Instant::now()
}

impl<M: LeaseManager> LeaseManager for MeteredManager<M> {
    fn lease_duration_ms(&self) -> u64 {
        self.inner.lease_duration_ms()
    }

    async fn acquire(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.inner.acquire(actor_id, node_id).await
    }

    async fn renew(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        let from = started();
        let result = self.inner.renew(actor_id, node_id).await;
        self.metrics.renewal_latency.observe(from.elapsed());
        result
    }

    async fn release(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.inner.release(actor_id, node_id).await
    }

    async fn renew_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        let from = started();
        let result = self
            .inner
            .renew_fenced(actor_id, node_id, fencing_token)
            .await;
        self.metrics.renewal_latency.observe(from.elapsed());
        result
    }

    async fn release_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        self.inner
            .release_fenced(actor_id, node_id, fencing_token)
            .await
    }

    async fn is_valid(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<bool, LeaseError> {
        self.inner.is_valid(actor_id, node_id).await
    }

    async fn get(&self, actor_id: &ActorId) -> Result<Option<Lease>, LeaseError> {
        self.inner.get(actor_id).await
    }

    async fn leases_held_by(&self, node_id: &NodeId) -> Result<Vec<Lease>, LeaseError> {
        self.inner.leases_held_by(node_id).await
    }

    async fn watch_until_free(
        &self,
        actor_id: &ActorId,
        max_wait_ms: u64,
    ) -> Result<Option<bool>, LeaseError> {
        self.inner.watch_until_free(actor_id, max_wait_ms).await
    }
}
