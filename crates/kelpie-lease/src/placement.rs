//! Placement over a bare keeper: each virtual actor is active on at most one node, and only
//! while that node holds its lease.
//!
//! A [`KeeperPlacement`] activates an actor only after its node's [`LeaseKeeper`] acquired the
//! actor's lease, keeps it active exactly while the keeper believes it still holds the lease
//! ([`KeeperPlacement::active_token`] is the keeper's belief, read at the moment of asking), and
//! forgets it when the keeper reports the lease lost. Safety argument: the keeper's belief is
//! measured from the moment the acquire or renewal was *sent* and shortened by the drift bound
//! and a margin, so it ends before the store's expiry; the store grants the lease to another
//! node only after that expiry. So two nodes can never both see `active_token` return a token
//! for the same actor at the same instant. A node that acts late anyway (a write that was
//! delayed on its way) carries the fencing token it was activated with, and a fenced state
//! store ([`crate::FencedStateStore`]) refuses it once a newer holder has been seen.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kelpie_core::{ActorId, FencingToken, NodeId};

use crate::error::LeaseError;
use crate::keeper::{KeeperEvent, LeaseKeeper};
use crate::lease::Lease;
use crate::manager::LeaseManager;

/// Where an actor lives, as [`KeeperPlacement::activate_or_locate`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// Active on this node, under the lease with this token. Every write of the actor's state
    /// must carry the token.
    Local {
        /// The token of the lease this node holds.
        fencing_token: FencingToken,
    },
    /// Active on another node, which holds a valid lease on it: route requests there.
    Remote {
        /// The holder of the lease: the node id and its process's incarnation, as
        /// [`LeaseKeeper::holder_id`] gives it (`node-b@1234…`).
        holder: NodeId,
    },
}

/// Activates actors on one node under their leases. Share it with `Arc`; the keeper's
/// [`run`](LeaseKeeper::run) must be driven elsewhere (it renews the leases), and the keeper's
/// events should be passed to [`on_keeper_event`](Self::on_keeper_event).
pub struct KeeperPlacement<M> {
    keeper: Arc<LeaseKeeper<M>>,
    /// Actors activated here, with the token they were activated under. An entry whose token
    /// the keeper no longer believes in is stale and is dropped when seen.
    active: Mutex<BTreeMap<ActorId, FencingToken>>,
    /// Deliberately wrong (mutation): an activation stays in force after the belief ends.
    #[cfg(feature = "mutations")]
    activation_outlives_lease: bool,
}

impl<M: LeaseManager> KeeperPlacement<M> {
    /// Deliberately wrong: an actor stays active after the keeper's belief in its lease
    /// ended, as a runtime that checked the lease only on activation would. Only for showing
    /// that the simulator's single-activation check catches it.
    #[cfg(feature = "mutations")]
    pub fn with_mutation_activation_outlives_lease(mut self) -> Self {
        self.activation_outlives_lease = true;
        self
    }

    /// Whether an activation counts while the keeper no longer believes in its lease.
    fn activation_outlives_lease(&self) -> bool {
        #[cfg(feature = "mutations")]
        return self.activation_outlives_lease;
        #[cfg(not(feature = "mutations"))]
        false
    }

    /// Placement for the keeper's node; [`where_is`](Self::where_is) reads the store through
    /// the keeper's own manager.
    pub fn new(keeper: Arc<LeaseKeeper<M>>) -> Self {
        Self {
            keeper,
            active: Mutex::new(BTreeMap::new()),
            #[cfg(feature = "mutations")]
            activation_outlives_lease: false,
        }
    }

    /// The node this placement activates actors on.
    pub fn node_id(&self) -> &NodeId {
        self.keeper.node_id()
    }

    /// The keeper whose beliefs decide what is active.
    pub fn keeper(&self) -> &Arc<LeaseKeeper<M>> {
        &self.keeper
    }

    /// Activates `actor_id` here if its lease can be acquired, or says which node holds it.
    ///
    /// An actor already active here is returned as it is. Otherwise the keeper acquires the
    /// lease (and from then on renews it); the actor is active as soon as the keeper believes
    /// the grant.
    ///
    /// # Errors
    /// [`LeaseError::Store`] if the store failed or could not be reached (the acquire may have
    /// been applied; retrying is safe), and [`LeaseError::Expired`] if the grant arrived so
    /// late that the belief it supports had already ended: the node must not act on it, and
    /// the keeper reports the loss. Other refusals are passed on as the store gave them.
    pub async fn activate_or_locate(&self, actor_id: &ActorId) -> Result<Location, LeaseError> {
        if let Some(fencing_token) = self.active_token(actor_id) {
            return Ok(Location::Local { fencing_token });
        }
        match self.keeper.acquire(actor_id).await {
            Ok(lease) => self.activate(actor_id, &lease),
            Err(LeaseError::HeldByOther { holder, .. }) => Ok(Location::Remote { holder }),
            Err(error) => Err(error),
        }
    }

    fn activate(&self, actor_id: &ActorId, lease: &Lease) -> Result<Location, LeaseError> {
        // The belief is measured from the request's send time, so a reply delayed past the
        // belief's end grants nothing the node may act on.
        match self.keeper.holds(actor_id) {
            Some(fencing_token) if fencing_token == lease.fencing_token => {
                self.lock().insert(actor_id.clone(), fencing_token);
                Ok(Location::Local { fencing_token })
            }
            _ => Err(LeaseError::Expired {
                actor_id: actor_id.clone(),
                node_id: self.keeper.holder_id().clone(),
                expired_at_ms: lease.expires_at_ms,
            }),
        }
    }

    /// Which node holds a valid lease on `actor_id`, in the store's view now (for routing).
    /// The answer can be out of date by the time it arrives; a request routed on it may find
    /// the actor gone and must ask again.
    ///
    /// # Errors
    /// [`LeaseError::Store`] if the store could not be read.
    pub async fn where_is(&self, actor_id: &ActorId) -> Result<Option<NodeId>, LeaseError> {
        let lease = self.keeper.manager().get(actor_id).await?;
        Ok(lease.map(|lease| lease.holder))
    }

    /// The token the actor is active under on this node now, or `None` if it is not active.
    ///
    /// This is the keeper's belief at this instant, so it turns `None` exactly when the belief
    /// ends, which is before the store's expiry. Ask it right before every action taken as the
    /// actor's holder, and carry the token along with the action.
    pub fn active_token(&self, actor_id: &ActorId) -> Option<FencingToken> {
        let mut active = self.lock();
        let activated = *active.get(actor_id)?;
        if self.keeper.holds(actor_id) == Some(activated) || self.activation_outlives_lease() {
            return Some(activated);
        }
        active.remove(actor_id);
        None
    }

    /// Every actor active here now, with its token, in actor id order.
    pub fn active_actors(&self) -> Vec<(ActorId, FencingToken)> {
        let mut active = self.lock();
        active.retain(|actor_id, token| self.keeper.holds(actor_id) == Some(*token));
        active.iter().map(|(a, t)| (a.clone(), *t)).collect()
    }

    /// Deactivates `actor_id` and releases its lease. The actor stops being active before the
    /// release is sent, so the node never acts as holder of a lease the store may already have
    /// handed on.
    ///
    /// Returns the released lease, or `None` if the actor was not active here or the store
    /// said the lease was no longer this node's (it had been lost already).
    ///
    /// # Errors
    /// [`LeaseError::Store`] if the store never confirmed the release; the actor is inactive
    /// here all the same, and the lease expires on its own.
    pub async fn deactivate(&self, actor_id: &ActorId) -> Result<Option<Lease>, LeaseError> {
        let was_active = self.lock().remove(actor_id).is_some();
        if !was_active && self.keeper.holds(actor_id).is_none() {
            return Ok(None);
        }
        match self.keeper.release(actor_id).await {
            Ok(lease) => Ok(Some(lease)),
            Err(refusal) if refusal.is_refusal() => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Takes in an event from the keeper: a lost lease deactivates its actor. Returns the
    /// actor deactivated by it, if it was active here under the lost token.
    pub fn on_keeper_event(&self, event: &KeeperEvent) -> Option<ActorId> {
        match event {
            KeeperEvent::Lost {
                actor_id,
                fencing_token,
                ..
            } => {
                let mut active = self.lock();
                if active.get(actor_id) != Some(fencing_token) {
                    return None;
                }
                active.remove(actor_id);
                Some(actor_id.clone())
            }
            // Grants, renewals and releases change nothing here: activation follows
            // activate_or_locate and deactivate, and validity the keeper's belief.
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ActorId, FencingToken>> {
        self.active
            .lock()
            .expect("placement state poisoned by a panic")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keeper::{KeeperConfig, LostReason};
    use crate::lease::LeaseConfig;
    use crate::manager::MemoryLeaseManager;
    use futures::executor::block_on;
    use kelpie_core::ManualClock;

    const LEASE_MS: u64 = 900;

    struct Node {
        placement: KeeperPlacement<MemoryLeaseManager>,
    }

    fn cluster(names: &[&str]) -> (ManualClock, Arc<MemoryLeaseManager>, Vec<Node>) {
        let clock = ManualClock::new(0);
        let config = LeaseConfig::new(LEASE_MS).unwrap();
        let manager = Arc::new(MemoryLeaseManager::in_memory(
            Arc::new(clock.clone()),
            config,
        ));
        let nodes = names
            .iter()
            .map(|name| {
                let node_id = NodeId::new(*name).unwrap();
                let shared = Arc::new(clock.clone());
                let config = KeeperConfig::default();
                let (keeper, _events) =
                    LeaseKeeper::new(Arc::clone(&manager), shared, node_id, config).unwrap();
                Node {
                    placement: KeeperPlacement::new(keeper),
                }
            })
            .collect();
        (clock, manager, nodes)
    }

    fn actor() -> ActorId {
        ActorId::new("counter-1").unwrap()
    }

    #[test]
    fn activates_once_and_others_are_routed_to_the_holder() {
        let (_clock, _manager, nodes) = cluster(&["a", "b"]);
        let (a, b) = (&nodes[0].placement, &nodes[1].placement);
        let local = block_on(a.activate_or_locate(&actor())).unwrap();
        let Location::Local { fencing_token } = local else {
            panic!("expected a local activation, got {local:?}");
        };
        assert_eq!(a.active_token(&actor()), Some(fencing_token));
        assert_eq!(
            block_on(a.activate_or_locate(&actor())).unwrap(),
            local,
            "an active actor is returned as it is"
        );
        let remote = block_on(b.activate_or_locate(&actor())).unwrap();
        assert_eq!(
            remote,
            Location::Remote {
                holder: a.keeper().holder_id().clone()
            }
        );
        assert_eq!(b.active_token(&actor()), None);
        assert_eq!(
            block_on(b.where_is(&actor())).unwrap(),
            Some(a.keeper().holder_id().clone())
        );
        assert_eq!(a.active_actors(), vec![(actor(), fencing_token)]);
    }

    #[test]
    fn deactivation_releases_and_the_next_holder_gets_a_larger_token() {
        let (_clock, _manager, nodes) = cluster(&["a", "b"]);
        let (a, b) = (&nodes[0].placement, &nodes[1].placement);
        let Location::Local {
            fencing_token: first,
        } = block_on(a.activate_or_locate(&actor())).unwrap()
        else {
            panic!("a activates first");
        };
        let released = block_on(a.deactivate(&actor())).unwrap().unwrap();
        assert_eq!(released.fencing_token, first);
        assert_eq!(a.active_token(&actor()), None);
        assert_eq!(block_on(a.where_is(&actor())).unwrap(), None);
        assert_eq!(block_on(a.deactivate(&actor())).unwrap(), None);
        let Location::Local {
            fencing_token: second,
        } = block_on(b.activate_or_locate(&actor())).unwrap()
        else {
            panic!("b activates after the release");
        };
        assert!(second > first);
    }

    #[test]
    fn activity_ends_with_the_belief_before_the_store_expiry() {
        let (clock, manager, nodes) = cluster(&["a", "b"]);
        let (a, b) = (&nodes[0].placement, &nodes[1].placement);
        let Location::Local { fencing_token } = block_on(a.activate_or_locate(&actor())).unwrap()
        else {
            panic!("a activates");
        };
        let lease = block_on(manager.get(&actor())).unwrap().unwrap();
        // Nobody renews here (the keeper's loop is not driven), so the belief runs out.
        let belief_ms = a.keeper().timing().belief_config().belief_duration_ms();
        clock.advance_ms(belief_ms - 1);
        assert_eq!(a.active_token(&actor()), Some(fencing_token));
        clock.advance_ms(1);
        assert_eq!(a.active_token(&actor()), None, "the belief ended");
        assert!(
            belief_ms < lease.expires_at_ms,
            "inactive before the store's expiry"
        );
        assert!(matches!(
            block_on(b.activate_or_locate(&actor())).unwrap(),
            Location::Remote { .. }
        ));
        clock.advance_ms(lease.expires_at_ms - belief_ms);
        let taken = block_on(b.activate_or_locate(&actor())).unwrap();
        assert!(matches!(taken, Location::Local { fencing_token: t } if t > fencing_token));
        assert!(a.active_actors().is_empty());
    }

    #[test]
    fn a_lost_event_deactivates_only_the_tenure_it_names() {
        let (_clock, _manager, nodes) = cluster(&["a"]);
        let a = &nodes[0].placement;
        let Location::Local { fencing_token } = block_on(a.activate_or_locate(&actor())).unwrap()
        else {
            panic!("a activates");
        };
        let lost = |fencing_token| KeeperEvent::Lost {
            actor_id: actor(),
            fencing_token,
            reason: LostReason::BeliefExpired,
        };
        assert_eq!(a.on_keeper_event(&lost(fencing_token.next())), None);
        assert_eq!(a.active_token(&actor()), Some(fencing_token));
        assert_eq!(a.on_keeper_event(&lost(fencing_token)), Some(actor()));
        assert!(a.active_actors().is_empty());
        assert_eq!(a.on_keeper_event(&lost(fencing_token)), None);
    }
}
