//! [`SwarmManager`]: the production lease manager a swarm node runs, over whichever store the
//! run simulates: the lease protocol (`decide`) behind the simulated network, or the etcd
//! backend over the simulated etcd.

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::backend::ProtocolLeaseManager;
use kelpie_lease::{EtcdLeaseManager, FencedRequest, Lease, LeaseError, LeaseManager};

use crate::lease_net::NetLeaseStore;
use crate::sim_etcd::NetEtcd;

/// The store a swarm simulates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SwarmStore {
    /// The lease protocol's own store: `decide` applied atomically, as the memory and SQLite
    /// stores do (the default).
    #[default]
    Protocol,
    /// The etcd backend (sessions, `create_revision` tokens, watches) over the simulated etcd.
    Etcd,
}

impl SwarmStore {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SwarmStore::Protocol => "protocol",
            SwarmStore::Etcd => "etcd",
        }
    }
}

/// A swarm node's lease manager: production code over a simulated store.
pub enum SwarmManager {
    /// [`ProtocolLeaseManager`] over the simulated network and store.
    Protocol(ProtocolLeaseManager<NetLeaseStore>),
    /// [`EtcdLeaseManager`] over the simulated etcd.
    Etcd(EtcdLeaseManager<NetEtcd>),
}

/// Calls the manager a node runs. The etcd backend's futures are several times the size of
/// the protocol's (2,320 bytes against 648 for a keeper's renewal, measured), and an enum's
/// future is as large as its largest arm: every request future is copied into its keeper's
/// round (into a box when the round makes several requests), and at 50 nodes those copies
/// were the largest source of cache-missing writes.
/// So the etcd arm is boxed, and only etcd runs pay for its size. It is boxed as a trait
/// object, polled through a call that is not inlined, for the same reason in machine code: a
/// concrete box's poll is inlined, and the etcd backend's code then sat inside every keeper
/// request's poll in a protocol run, where the hot path overflows the instruction cache.
macro_rules! dispatch {
    ($self:ident, $m:ident => $call:expr) => {
        match $self {
            SwarmManager::Protocol($m) => $call,
            SwarmManager::Etcd($m) => {
                let call: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
                    Box::pin(async move { $call });
                call.await
            }
        }
    };
}

impl LeaseManager for SwarmManager {
    fn lease_duration_ms(&self) -> u64 {
        match self {
            SwarmManager::Protocol(m) => m.lease_duration_ms(),
            SwarmManager::Etcd(m) => m.lease_duration_ms(),
        }
    }

    async fn acquire(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        dispatch!(self, m => m.acquire(actor_id, node_id).await)
    }

    async fn renew(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        dispatch!(self, m => m.renew(actor_id, node_id).await)
    }

    async fn release(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        dispatch!(self, m => m.release(actor_id, node_id).await)
    }

    async fn renew_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        dispatch!(self, m => m.renew_fenced(actor_id, node_id, fencing_token).await)
    }

    async fn release_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        dispatch!(self, m => m.release_fenced(actor_id, node_id, fencing_token).await)
    }

    async fn fenced_round(
        &self,
        node_id: &NodeId,
        requests: &[FencedRequest],
    ) -> Vec<Result<Lease, LeaseError>> {
        dispatch!(self, m => m.fenced_round(node_id, requests).await)
    }

    async fn is_valid(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<bool, LeaseError> {
        dispatch!(self, m => m.is_valid(actor_id, node_id).await)
    }

    async fn get(&self, actor_id: &ActorId) -> Result<Option<Lease>, LeaseError> {
        dispatch!(self, m => m.get(actor_id).await)
    }

    async fn leases_held_by(&self, node_id: &NodeId) -> Result<Vec<Lease>, LeaseError> {
        dispatch!(self, m => m.leases_held_by(node_id).await)
    }

    async fn watch_until_free(
        &self,
        actor_id: &ActorId,
        max_wait_ms: u64,
    ) -> Result<Option<bool>, LeaseError> {
        dispatch!(self, m => m.watch_until_free(actor_id, max_wait_ms).await)
    }
}
