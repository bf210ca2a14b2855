//! Single activation over a node's [`LeaseSession`], with the actor's state fenced on
//! activation.
//!
//! A [`Placement`] activates an actor on this node in three steps that cannot be separated:
//! it acquires the actor's lease through the session (a [`LeaseGuard`]), then *fences* the
//! actor's [`FencedStateStore`] with the new token, which makes the store refuse every later
//! write of an earlier holder and returns the state as its last holder left it, and only then
//! hands out an [`Activation`]. Every write through the activation carries its token, so the
//! state store refuses it once a later holder has been activated, however late it arrives (a
//! paused process, a slow network); a late write that arrives before any successor was
//! activated is accepted, and the successor's activation reads it. The activation's
//! cancellation fires before the node's belief in the lease ends: stop the actor's work then.
//!
//! Use [`KeeperPlacement`](crate::KeeperPlacement) to place actors over a bare
//! [`LeaseKeeper`](crate::LeaseKeeper) instead (the simulator does, to drive the keeper step by
//! step); it leaves fencing to the caller.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kelpie_core::{ActorId, FencingToken, NodeId};

use crate::error::LeaseError;
use crate::fenced::{FencedStateStore, StateError};
use crate::manager::LeaseManager;
use crate::session::{LeaseGuard, LeaseSession, SessionError};
use tokio_util::sync::CancellationToken;

/// Why an activation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// The lease could not be acquired (other than being held elsewhere, which
    /// [`Placed::Remote`] reports), or the session is shutting down.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The state store refused the fence or failed; the lease was released again. A
    /// [`StateError::StaleToken`] here means a later holder fenced the actor first: this
    /// node's lease is already superseded.
    #[error("{actor_id} was not activated: fencing it at the state store failed: {source}")]
    Fence {
        /// The actor.
        actor_id: ActorId,
        /// What the state store said.
        source: StateError,
    },
}

/// Where an actor is, as [`Placement::activate_or_locate`] found it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Placed<S> {
    /// Active here.
    Local(Arc<Activation<S>>),
    /// Held by another node: route requests there.
    Remote {
        /// The holder: node id and process incarnation (`node-b@1234…`).
        holder: NodeId,
    },
}

/// An actor active on this node: its lease's fencing token, the cancellation that fires
/// before the node's belief in the lease ends, the state its activation read, and writes that
/// carry the token.
#[derive(Debug)]
pub struct Activation<S> {
    actor_id: ActorId,
    fencing_token: FencingToken,
    cancel: CancellationToken,
    initial_state: Option<Vec<u8>>,
    state: Arc<S>,
    /// The lease; taken out by [`Placement::deactivate`] to release it.
    guard: Mutex<Option<LeaseGuard>>,
}

impl<S: FencedStateStore> Activation<S> {
    /// The actor.
    pub fn actor_id(&self) -> &ActorId {
        &self.actor_id
    }

    /// The token of the lease this activation holds; every write carries it.
    pub fn fencing_token(&self) -> FencingToken {
        self.fencing_token
    }

    /// Fires before the node's belief in the lease ends, when the lease is lost, and on
    /// deactivation: stop the actor's work then.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the actor may still act here: its cancellation has not fired, and the node's
    /// belief in its lease, read against the clock now, ends beyond the session's cancel lead
    /// (see [`LeaseGuard::is_valid`]; this does not depend on the session's driver having run).
    pub fn is_active(&self) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        let guard = self.guard.lock().expect("activation poisoned by a panic");
        guard.as_ref().is_some_and(LeaseGuard::is_valid)
    }

    /// The actor's state as the activation's fence read it: the last value its previous
    /// holders wrote, or `None` if none ever did.
    pub fn initial_state(&self) -> Option<&[u8]> {
        self.initial_state.as_deref()
    }

    /// Writes the actor's state, carrying the activation's token. The token, not a check
    /// here, is what keeps a superseded holder out: a check could pass just before a pause.
    ///
    /// # Errors
    /// [`StateError::StaleToken`] if a later holder was activated (fenced the store); the
    /// store's other errors as [`FencedStateStore::write`] gives them.
    pub async fn write(&self, value: &[u8]) -> Result<(), StateError> {
        self.state
            .write(&self.actor_id, self.fencing_token, value)
            .await
    }
}

/// Activates actors on one node under the leases of its [`LeaseSession`], fencing their state
/// store on each activation; see the module docs. Share it with `Arc`.
pub struct Placement<M, S> {
    session: LeaseSession<M>,
    state: Arc<S>,
    active: Mutex<BTreeMap<ActorId, Arc<Activation<S>>>>,
}

impl<M: LeaseManager + 'static, S: FencedStateStore> Placement<M, S> {
    /// Placement for the session's node, with the actors' state in `state`.
    pub fn new(session: LeaseSession<M>, state: Arc<S>) -> Self {
        Self {
            session,
            state,
            active: Mutex::new(BTreeMap::new()),
        }
    }

    /// The session whose leases the activations hold.
    pub fn session(&self) -> &LeaseSession<M> {
        &self.session
    }

    /// The actor's activation here if it is active, or activates it (acquire, then fence the
    /// state store) if its lease is free, or names the node that holds it.
    ///
    /// # Errors
    /// [`PlacementError::Session`] if the store refused otherwise or failed (retrying is
    /// safe), [`PlacementError::Fence`] if the state store refused the new token or failed
    /// (the lease is released again).
    pub async fn activate_or_locate(
        &self,
        actor_id: &ActorId,
    ) -> Result<Placed<S>, PlacementError> {
        if let Some(activation) = self.active(actor_id) {
            return Ok(Placed::Local(activation));
        }
        let guard = match self.session.acquire(actor_id).await {
            Ok(guard) => guard,
            Err(SessionError::Lease(LeaseError::HeldByOther { holder, .. })) => {
                return Ok(Placed::Remote { holder });
            }
            Err(error) => return Err(error.into()),
        };
        self.fence(guard).await.map(Placed::Local)
    }

    /// Waits until the actor's lease is held here (see [`LeaseSession::campaign`]), then
    /// fences the state store and activates it.
    ///
    /// # Errors
    /// As [`activate_or_locate`](Self::activate_or_locate).
    pub async fn campaign(&self, actor_id: &ActorId) -> Result<Arc<Activation<S>>, PlacementError> {
        if let Some(activation) = self.active(actor_id) {
            return Ok(activation);
        }
        let guard = self.session.campaign(actor_id).await?;
        self.fence(guard).await
    }

    async fn fence(&self, guard: LeaseGuard) -> Result<Arc<Activation<S>>, PlacementError> {
        let actor_id = guard.actor_id().clone();
        let fencing_token = guard.fencing_token();
        let initial_state = match self.state.fence(&actor_id, fencing_token).await {
            Ok(state) => state.value,
            Err(source) => {
                // Superseded or unreachable: not ours to act on. The release may fail; the
                // lease then expires on its own.
                let _ = self.session.release(guard).await;
                return Err(PlacementError::Fence { actor_id, source });
            }
        };
        let activation = Arc::new(Activation {
            actor_id: actor_id.clone(),
            fencing_token,
            cancel: guard.cancellation().clone(),
            initial_state,
            state: Arc::clone(&self.state),
            guard: Mutex::new(Some(guard)),
        });
        self.lock().insert(actor_id, Arc::clone(&activation));
        Ok(activation)
    }

    /// The actor's activation here, if it is active now.
    pub fn active(&self, actor_id: &ActorId) -> Option<Arc<Activation<S>>> {
        let mut active = self.lock();
        let activation = active.get(actor_id)?;
        if activation.is_active() {
            return Some(Arc::clone(activation));
        }
        // Its lease ended: dropping the guard lets the session release what is left of it.
        active.remove(actor_id);
        None
    }

    /// Every actor active here now, in actor id order.
    pub fn active_actors(&self) -> Vec<Arc<Activation<S>>> {
        let mut active = self.lock();
        active.retain(|_, activation| activation.is_active());
        active.values().cloned().collect()
    }

    /// Deactivates the actor and releases its lease: the activation's cancellation fires
    /// first, so nothing acts as holder of a lease the store may already have handed on.
    /// Returns whether it was active here.
    ///
    /// # Errors
    /// The store's answer if it failed to confirm the release (the lease expires on its own).
    pub async fn deactivate(&self, actor_id: &ActorId) -> Result<bool, LeaseError> {
        let Some(activation) = self.lock().remove(actor_id) else {
            return Ok(false);
        };
        activation.cancel.cancel();
        let guard = activation
            .guard
            .lock()
            .expect("activation poisoned by a panic")
            .take();
        match guard {
            Some(guard) => match self.session.release(guard).await {
                Err(refusal) if refusal.is_refusal() => Ok(true),
                other => other.map(|()| true),
            },
            None => Ok(true),
        }
    }

    /// Which node holds a valid lease on the actor, in the store's view now (for routing).
    ///
    /// # Errors
    /// [`LeaseError::Store`] if the store could not be read.
    pub async fn where_is(&self, actor_id: &ActorId) -> Result<Option<NodeId>, LeaseError> {
        let lease = self.session.keeper().manager().get(actor_id).await?;
        Ok(lease.map(|lease| lease.holder))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ActorId, Arc<Activation<S>>>> {
        self.active
            .lock()
            .expect("placement state poisoned by a panic")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ProtocolLeaseManager;
    use crate::fenced::MemoryFencedStateStore;
    use crate::session::{SessionConfig, SessionDriver};
    use crate::test_support::{FlakyStore, PausedClock};
    use crate::LeaseConfig;
    use kelpie_core::SharedClock;
    use std::time::Duration;

    type Manager = ProtocolLeaseManager<FlakyStore>;
    type NodePlacement = Placement<Manager, MemoryFencedStateStore>;

    /// Short leases, on tokio's paused clock: the tests take no real time, and no scheduling
    /// delay of a loaded machine can lapse a lease.
    const LEASE_MS: u64 = 300;
    /// Longest a test waits (paused time) for something that must happen within a lease or two.
    const WAIT_MS_MAX: u64 = 5_000;

    struct World {
        clock: SharedClock,
        manager: Arc<Manager>,
        state: Arc<MemoryFencedStateStore>,
    }

    impl World {
        fn new() -> Self {
            let clock: SharedClock = PausedClock::shared();
            let store = FlakyStore::new(Arc::clone(&clock));
            let manager = Arc::new(Manager::new(store, LeaseConfig::new(LEASE_MS).unwrap()));
            let state = Arc::new(MemoryFencedStateStore::new());
            Self {
                clock,
                manager,
                state,
            }
        }

        fn node(&self, name: &str) -> NodePlacement {
            let (placement, driver) = self.node_and_driver(name);
            drop(tokio::spawn(driver.run()));
            placement
        }

        /// A node whose session driver is the caller's to run, or not.
        fn node_and_driver(&self, name: &str) -> (NodePlacement, SessionDriver<Manager>) {
            let (session, driver) = LeaseSession::new(
                Arc::clone(&self.manager),
                Arc::clone(&self.clock),
                NodeId::new(name).unwrap(),
                SessionConfig::default(),
            )
            .unwrap();
            (Placement::new(session, Arc::clone(&self.state)), driver)
        }
    }

    fn actor() -> ActorId {
        ActorId::new("counter-1").unwrap()
    }

    async fn local(placement: &NodePlacement) -> Arc<Activation<MemoryFencedStateStore>> {
        match placement.activate_or_locate(&actor()).await.unwrap() {
            Placed::Local(activation) => activation,
            Placed::Remote { holder } => panic!("expected a local activation, held by {holder}"),
        }
    }

    /// The successor's activation reads its predecessor's last write, and the predecessor's
    /// token is refused from then on: by its activation before anything is sent, and by the
    /// state store for a write that was already on its way.
    #[tokio::test(start_paused = true)]
    async fn activation_fences_the_state_and_reads_the_predecessors_last_write() {
        let world = World::new();
        let (a, b) = (world.node("a"), world.node("b"));
        let first = local(&a).await;
        assert_eq!(first.initial_state(), None);
        first.write(b"from a").await.unwrap();
        assert!(Arc::ptr_eq(&local(&a).await, &first), "active is returned");
        match b.activate_or_locate(&actor()).await.unwrap() {
            Placed::Remote { holder } => assert_eq!(&holder, a.session().holder_id()),
            Placed::Local(_) => panic!("two activations at once"),
        }
        assert_eq!(
            b.where_is(&actor()).await.unwrap().as_ref(),
            Some(a.session().holder_id())
        );

        assert!(a.deactivate(&actor()).await.unwrap());
        assert!(!first.is_active() && a.active(&actor()).is_none());
        let second = local(&b).await;
        assert!(second.fencing_token() > first.fencing_token());
        assert_eq!(second.initial_state(), Some(&b"from a"[..]));

        let late = first.write(b"late").await.unwrap_err();
        assert!(matches!(late, StateError::StaleToken { .. }), "{late}");
        second.write(b"from b").await.unwrap();
        assert!(
            !a.deactivate(&actor()).await.unwrap(),
            "a is not active any more"
        );
    }

    /// The session's driver does not run (a runtime too busy to schedule it): the activation
    /// stops being active at its deadline all the same, and activating the actor again on
    /// the same node, while the store still counts it as holder, fences out the first
    /// activation's writes: the two never share a token.
    #[tokio::test(start_paused = true)]
    async fn an_activation_ends_on_time_without_its_driver_and_its_successor_here_fences_it() {
        let world = World::new();
        let (a, _driver) = world.node_and_driver("a");
        let first = local(&a).await;
        let session = a.session();
        let belief = session.keeper().belief(&actor()).unwrap();
        let deadline_ms = belief.until_local_ms - session.timing().cancel_lead_ms;
        world
            .clock
            .sleep(Duration::from_millis(deadline_ms - world.clock.now_ms()))
            .await;
        assert!(!first.is_active(), "past its deadline, driver or not");
        assert!(a.active(&actor()).is_none());

        let second = local(&a).await;
        assert!(second.fencing_token() > first.fencing_token());
        let late = first.write(b"late").await.unwrap_err();
        assert!(matches!(late, StateError::StaleToken { .. }), "{late}");
        second.write(b"second").await.unwrap();
        drop(first);
        assert!(
            second.is_active(),
            "the first's drop leaves the second's lease alone"
        );
    }

    /// Renewals fail: the activation is cancelled before the belief ends and the placement no
    /// longer lists it. A write it makes anyway lands while no successor was activated, and
    /// the successor's activation reads it.
    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_ends_the_activation_and_its_writes() {
        let world = World::new();
        let a = world.node("a");
        let activation = local(&a).await;
        assert_eq!(a.active_actors().len(), 1);
        world.manager.store().set_down(true);
        let waited = tokio::time::timeout(
            Duration::from_millis(WAIT_MS_MAX),
            activation.cancellation().cancelled(),
        );
        waited
            .await
            .expect("the activation is cancelled when renewals fail");
        assert!(a.active(&actor()).is_none() && a.active_actors().is_empty());
        activation.write(b"after the belief").await.unwrap();
        world.manager.store().set_down(false);
        let b = world.node("b");
        let wanted = actor();
        let successor =
            tokio::time::timeout(Duration::from_millis(WAIT_MS_MAX), b.campaign(&wanted));
        let successor = successor.await.expect("b takes over").unwrap();
        assert!(successor.fencing_token() > activation.fencing_token());
        assert_eq!(successor.initial_state(), Some(&b"after the belief"[..]));
        let late = activation.write(b"too late").await.unwrap_err();
        assert!(matches!(late, StateError::StaleToken { .. }), "{late}");
    }

    /// The state store was fenced by a later token than the one granted (a newer holder got
    /// there first): the activation is refused and its lease released for the next one.
    #[tokio::test(start_paused = true)]
    async fn a_refused_fence_activates_nothing_and_releases_the_lease() {
        let world = World::new();
        let a = world.node("a");
        world
            .state
            .fence(&actor(), FencingToken(1_000))
            .await
            .unwrap();
        let error = a.activate_or_locate(&actor()).await.unwrap_err();
        assert!(
            matches!(
                &error,
                PlacementError::Fence {
                    source: StateError::StaleToken { .. },
                    ..
                }
            ),
            "{error}"
        );
        assert!(a.active(&actor()).is_none());
        assert_eq!(world.manager.get(&actor()).await.unwrap(), None, "released");
    }
}
