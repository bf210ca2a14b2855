//! The invariants of `docs/tla/KelpieLease.tla`, one per file, evaluated after every
//! simulation step against the store's ground truth, the decisions the store made, and the
//! nodes' beliefs.
//!
//! - [`LeaseUniqueness`]: at most one node believes it holds an actor's lease.
//! - [`BeliefConsistency`]: a node that believes it holds a lease does, on the store's clock.
//! - [`RenewalRequiresOwnership`]: only the holder of an unexpired lease extends it.
//! - [`ExpiredLeaseClaimable`]: an acquire of a free or expired lease is granted.
//! - [`FencingTokenMonotonic`]: tokens never go down and every new holder's is larger.

mod belief_consistency;
mod expired_lease_claimable;
mod fencing_token_monotonic;
mod lease_uniqueness;
mod renewal_requires_ownership;
#[cfg(test)]
mod tests;

use kelpie_core::{ActorId, NodeId};
use kelpie_lease::{
    backend::Decision, backend::LeaseRecord, backend::LeaseRequest, machine::HeldBelief,
};

pub use belief_consistency::BeliefConsistency;
pub use expired_lease_claimable::ExpiredLeaseClaimable;
pub use fencing_token_monotonic::FencingTokenMonotonic;
pub use lease_uniqueness::LeaseUniqueness;
pub use renewal_requires_ownership::RenewalRequiresOwnership;

/// Per-actor state the checkers look up: hashed, since it is only ever looked up by actor (a
/// sorted map cost a dozen string comparisons, each reading two ids, per lookup at 10,000
/// actors), with a fixed hasher (foldhash at its fixed default seed: SipHash cost more than
/// the lookups it served) and insertion-order iteration, so nothing in it depends on the
/// process.
pub type ActorMap<V> = indexmap::IndexMap<ActorId, V, foldhash::fast::FixedState>;

/// A decision the store made, whether or not a fault then kept it from being applied or
/// answered. Decision-level invariants judge these.
#[derive(Debug, Clone)]
pub struct DecisionRecord {
    /// The actor decided on.
    pub actor_id: ActorId,
    /// The request.
    pub request: LeaseRequest,
    /// The record the decision saw.
    pub before: Option<LeaseRecord>,
    /// The store's clock at the decision.
    pub store_now_ms: u64,
    /// What was decided.
    pub decision: Decision,
}

/// A belief a node holds, with the global instant it ends.
#[derive(Debug, Clone)]
pub struct BeliefView {
    /// The believing node. (The actor is where the view is kept: its entry in the checkers'
    /// map, or in a node's beliefs.)
    pub node_id: NodeId,
    /// The belief, on the node's clock.
    pub held: HeldBelief,
    /// The global instant the belief ends: the first instant the node's clock reads
    /// `held.until_local_ms`. A later clock jump only brings it forward, and the simulator
    /// reports a jump as a change.
    pub until_global_ms: u64,
}

impl BeliefView {
    /// Whether the belief is in force at global time `now_ms`.
    pub fn held_at(&self, now_ms: u64) -> bool {
        now_ms < self.until_global_ms
    }
}

/// What the checkers know of one actor.
#[derive(Debug, Clone, Default)]
pub struct ActorView {
    /// The store's record now (ground truth: no faults, no latency), if it has one.
    pub record: Option<LeaseRecord>,
    /// Beliefs in the actor, including ones that have since ended (see
    /// [`BeliefView::held_at`]).
    pub beliefs: Vec<BeliefView>,
}

impl ActorView {
    /// The beliefs in force at global time `now_ms`.
    pub fn beliefs_held(&self, now_ms: u64) -> impl Iterator<Item = &BeliefView> {
        self.beliefs.iter().filter(move |b| b.held_at(now_ms))
    }
}

/// Everything a checker sees at one step. Checkers look only at the actors that changed
/// since the previous step: between changes, the truth stands still and beliefs only end.
///
/// Each actor's record and beliefs sit together in one entry of [`LeaseWorld::actors`], and
/// the changed actors are given by their index there, so a checker reaches what it judges
/// without a lookup (at 10,000 actors, each lookup was a cache miss or two, several per
/// changed actor and checker).
#[derive(Debug)]
pub struct LeaseWorld<'a> {
    /// The store's clock (global simulated time) now.
    pub store_now_ms: u64,
    /// Every actor seen so far. An actor keeps its index for the whole run (none is ever
    /// removed), so a checker may keep its own per-actor state by index.
    pub actors: &'a ActorMap<ActorView>,
    /// The indices in [`Self::actors`] of the actors whose record or beliefs changed since
    /// the previous step, in actor order, each once.
    pub changed_indices: &'a [usize],
    /// Decisions the store made since the previous step.
    pub decisions: &'a [DecisionRecord],
    /// Whether the store keeps an expired lease held until it deletes it (etcd: a key whose
    /// session's TTL ran out is deleted only by the revoke loop, and a new leader extends
    /// every undeleted lease to a full TTL). Then nobody can claim the lease in between, so
    /// the store extending it is not a renewal after expiry; renewals are still judged one by
    /// one from the store's decisions.
    pub held_until_deleted: bool,
}

impl LeaseWorld<'_> {
    /// The actors that changed, in actor order: each with its index, id and view.
    pub fn changed_actors(&self) -> impl Iterator<Item = (usize, &ActorId, &ActorView)> {
        self.changed_indices.iter().map(|&index| {
            let (actor_id, view) = self
                .actors
                .get_index(index)
                .expect("a changed actor is one of the actors");
            (index, actor_id, view)
        })
    }
}

/// One invariant.
pub trait Invariant {
    /// The name it has in the TLA+ spec.
    fn name(&self) -> &'static str;
    /// `Err` with a description of the violation.
    fn check(&mut self, world: &LeaseWorld<'_>) -> Result<(), String>;
}

/// Which invariants a run checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckerSet {
    /// Check [`LeaseUniqueness`].
    pub lease_uniqueness: bool,
    /// Check [`BeliefConsistency`].
    pub belief_consistency: bool,
    /// Check [`RenewalRequiresOwnership`].
    pub renewal_requires_ownership: bool,
    /// Check [`ExpiredLeaseClaimable`].
    pub expired_lease_claimable: bool,
    /// Check [`FencingTokenMonotonic`].
    pub fencing_token_monotonic: bool,
}

impl CheckerSet {
    /// Every invariant.
    pub const ALL: CheckerSet = CheckerSet {
        lease_uniqueness: true,
        belief_consistency: true,
        renewal_requires_ownership: true,
        expired_lease_claimable: true,
        fencing_token_monotonic: true,
    };

    /// No invariant.
    pub const NONE: CheckerSet = CheckerSet {
        lease_uniqueness: false,
        belief_consistency: false,
        renewal_requires_ownership: false,
        expired_lease_claimable: false,
        fencing_token_monotonic: false,
    };

    /// Only the invariant named `name` (its TLA+ name), or `None` for an unknown name.
    pub fn only(name: &str) -> Option<CheckerSet> {
        let mut set = CheckerSet::NONE;
        match name {
            "LeaseUniqueness" => set.lease_uniqueness = true,
            "BeliefConsistency" => set.belief_consistency = true,
            "RenewalRequiresOwnership" => set.renewal_requires_ownership = true,
            "ExpiredLeaseClaimable" => set.expired_lease_claimable = true,
            "FencingTokenMonotonic" => set.fencing_token_monotonic = true,
            _ => return None,
        }
        Some(set)
    }

    /// The enabled invariants, in a fixed order.
    pub fn build(&self) -> Vec<Box<dyn Invariant>> {
        let mut checkers: Vec<Box<dyn Invariant>> = Vec::new();
        if self.lease_uniqueness {
            checkers.push(Box::new(LeaseUniqueness));
        }
        if self.belief_consistency {
            checkers.push(Box::new(BeliefConsistency));
        }
        if self.renewal_requires_ownership {
            checkers.push(Box::new(RenewalRequiresOwnership::default()));
        }
        if self.expired_lease_claimable {
            checkers.push(Box::new(ExpiredLeaseClaimable));
        }
        if self.fencing_token_monotonic {
            checkers.push(Box::new(FencingTokenMonotonic::default()));
        }
        checkers
    }
}
