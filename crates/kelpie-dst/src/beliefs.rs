//! The nodes' beliefs, shared between the simulated nodes that update them and the checkers
//! that judge them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_registry::{Belief, BeliefConfig};

use crate::checkers::BeliefView;
use crate::clock::SimClock;

/// Every node's belief about every actor, with each node's local clock.
#[derive(Clone, Default)]
pub struct BeliefBoard {
    inner: Rc<RefCell<BoardInner>>,
}

#[derive(Default)]
struct BoardInner {
    clocks: BTreeMap<NodeId, SimClock>,
    beliefs: BTreeMap<(NodeId, ActorId), Belief>,
}

impl BeliefBoard {
    /// Registers a node and its clock.
    pub fn add_node(&self, node_id: &NodeId, clock: SimClock) {
        self.inner
            .borrow_mut()
            .clocks
            .insert(node_id.clone(), clock);
    }

    /// The node's request sent at local `sent_local_ms` was granted with `token`.
    pub fn granted(
        &self,
        config: &BeliefConfig,
        node_id: &NodeId,
        actor_id: &ActorId,
        sent_local_ms: u64,
        token: FencingToken,
    ) {
        let mut inner = self.inner.borrow_mut();
        let belief = inner
            .beliefs
            .entry((node_id.clone(), actor_id.clone()))
            .or_default();
        belief.on_granted(config, sent_local_ms, token);
    }

    /// The node stops believing it holds the actor.
    pub fn lost(&self, node_id: &NodeId, actor_id: &ActorId) {
        if let Some(belief) = self
            .inner
            .borrow_mut()
            .beliefs
            .get_mut(&(node_id.clone(), actor_id.clone()))
        {
            belief.on_lost();
        }
    }

    /// Whether the node believes it holds the actor now, on its own clock.
    pub fn holds(&self, node_id: &NodeId, actor_id: &ActorId) -> Option<FencingToken> {
        let inner = self.inner.borrow();
        let now_ms = inner.clocks.get(node_id).expect("node registered").now_ms();
        let belief = inner.beliefs.get(&(node_id.clone(), actor_id.clone()))?;
        belief.held_at(now_ms).map(|h| h.fencing_token)
    }

    /// Every belief held now.
    pub fn views(&self) -> Vec<BeliefView> {
        let inner = self.inner.borrow();
        let mut views = Vec::new();
        for ((node_id, actor_id), belief) in &inner.beliefs {
            let node_now_ms = inner.clocks.get(node_id).expect("node registered").now_ms();
            if let Some(held) = belief.held_at(node_now_ms) {
                let (node_id, actor_id) = (node_id.clone(), actor_id.clone());
                views.push(BeliefView {
                    node_id,
                    actor_id,
                    held,
                    node_now_ms,
                });
            }
        }
        views
    }
}
