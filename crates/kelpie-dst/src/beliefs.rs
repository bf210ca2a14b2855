//! The nodes' beliefs, shared between the simulated nodes that hold them and the checkers that
//! judge them. A node's beliefs come from its [`LeaseKeeper`](kelpie_lease::LeaseKeeper), the
//! production code: the one node model of the simulator.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use kelpie_core::{ActorId, NodeId};
use kelpie_lease::machine::HeldBelief;

use crate::checkers::BeliefView;
use kelpie_sim::SimClock;

/// What the board needs from a keeper: its beliefs now and a number that changes with them.
pub trait BeliefSource {
    /// Beliefs in force now.
    fn beliefs(&self) -> Vec<(ActorId, HeldBelief)>;
    /// Changes whenever a belief starts, is extended or is dropped.
    fn belief_epoch(&self) -> u64;
}

impl<M: kelpie_lease::LeaseManager> BeliefSource for std::sync::Arc<kelpie_lease::LeaseKeeper<M>> {
    fn beliefs(&self) -> Vec<(ActorId, HeldBelief)> {
        kelpie_lease::LeaseKeeper::beliefs(self)
    }

    fn belief_epoch(&self) -> u64 {
        kelpie_lease::LeaseKeeper::belief_epoch(self)
    }
}

/// One node's beliefs before and after a change.
pub(crate) struct NodeChange {
    pub(crate) node_id: NodeId,
    pub(crate) before: BTreeMap<ActorId, BeliefView>,
    pub(crate) after: BTreeMap<ActorId, BeliefView>,
}

impl NodeChange {
    /// The actors whose beliefs differ.
    pub(crate) fn changed_actors(&self) -> BTreeSet<ActorId> {
        changed_actors(&self.before, &self.after)
    }
}

struct NodeEntry {
    clock: SimClock,
    keeper: Option<Rc<dyn BeliefSource>>,
    /// Bumped on every crash, restart or clock jump.
    local_epoch: u64,
    /// (keeper epoch, local epoch) when the views below were taken.
    seen: Option<(u64, u64)>,
    /// The node's beliefs as last taken.
    views: BTreeMap<ActorId, BeliefView>,
}

/// Every node's beliefs, each with the node's clock.
#[derive(Clone, Default)]
pub struct BeliefBoard {
    nodes: Rc<RefCell<BTreeMap<NodeId, NodeEntry>>>,
}

impl BeliefBoard {
    /// Registers (or, after a restart, replaces) the keeper holding a node's beliefs.
    pub fn set_keeper(&self, node_id: &NodeId, clock: SimClock, keeper: Rc<dyn BeliefSource>) {
        let entry = NodeEntry {
            clock,
            keeper: Some(keeper),
            local_epoch: 0,
            seen: None,
            views: BTreeMap::new(),
        };
        self.nodes.borrow_mut().insert(node_id.clone(), entry);
    }

    /// The node crashed: its memory, and so every belief, is gone.
    pub fn crashed(&self, node_id: &NodeId) {
        self.with_node(node_id, |node| node.keeper = None);
    }

    /// The node's clock jumped: its beliefs end at other global instants now.
    pub fn clock_jumped(&self, node_id: &NodeId) {
        self.with_node(node_id, |_| {});
    }

    /// Re-reads the nodes whose beliefs may have changed and returns, per changed node, its
    /// views before and after. Cheap when nothing changed: one epoch comparison per node.
    pub(crate) fn take_changes(&self) -> Vec<NodeChange> {
        let mut changes = Vec::new();
        for (node_id, node) in self.nodes.borrow_mut().iter_mut() {
            let epoch = (
                node.keeper.as_ref().map_or(0, |k| k.belief_epoch()),
                node.local_epoch,
            );
            if node.seen == Some(epoch) {
                continue;
            }
            node.seen = Some(epoch);
            let after = node.read_views(node_id);
            let before = std::mem::replace(&mut node.views, after.clone());
            changes.push(NodeChange {
                node_id: node_id.clone(),
                before,
                after,
            });
        }
        changes
    }

    fn with_node(&self, node_id: &NodeId, change: impl FnOnce(&mut NodeEntry)) {
        let mut nodes = self.nodes.borrow_mut();
        let node = nodes.get_mut(node_id).expect("node registered");
        change(node);
        node.local_epoch += 1;
    }
}

impl NodeEntry {
    fn read_views(&self, node_id: &NodeId) -> BTreeMap<ActorId, BeliefView> {
        let held: Vec<(ActorId, HeldBelief)> = match &self.keeper {
            Some(keeper) => keeper.beliefs(),
            None => Vec::new(),
        };
        held.into_iter()
            .map(|(actor_id, held)| {
                let until_global_ms = self.clock.global_when_local_reaches(held.until_local_ms);
                let view = BeliefView {
                    node_id: node_id.clone(),
                    actor_id: actor_id.clone(),
                    held,
                    until_global_ms,
                };
                (actor_id, view)
            })
            .collect()
    }
}

/// The actors whose beliefs differ between two views of one node.
fn changed_actors(
    old: &BTreeMap<ActorId, BeliefView>,
    new: &BTreeMap<ActorId, BeliefView>,
) -> BTreeSet<ActorId> {
    let mut changed = BTreeSet::new();
    for (actor_id, view) in old {
        let same = new
            .get(actor_id)
            .is_some_and(|v| v.held == view.held && v.until_global_ms == view.until_global_ms);
        if !same {
            changed.insert(actor_id.clone());
        }
    }
    changed.extend(new.keys().filter(|a| !old.contains_key(*a)).cloned());
    changed
}
