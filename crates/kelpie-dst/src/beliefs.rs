//! The nodes' beliefs, shared between the simulated nodes that hold them and the checkers that
//! judge them. A node's beliefs come from its [`LeaseKeeper`](kelpie_lease::LeaseKeeper), the
//! production code: the one node model of the simulator.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kelpie_core::{ActorId, NodeId};
use kelpie_lease::machine::HeldBelief;

use crate::checkers::{ActorMap, BeliefView};
use kelpie_sim::SimClock;

/// What the board needs from a keeper: its beliefs now, and which of them changed.
pub trait BeliefSource {
    /// Beliefs in force now.
    fn beliefs(&self) -> Vec<(ActorId, HeldBelief)>;
    /// Calls `on_change` after every change of belief, and from then on remembers which
    /// actors changed.
    fn watch(&self, on_change: Box<dyn Fn() + Send + Sync>);
    /// The actors whose belief changed since the last call, with their belief in force now,
    /// appended to `taken`.
    fn take_changed(&self, taken: &mut Vec<(ActorId, Option<HeldBelief>)>);
}

impl<M: kelpie_lease::LeaseManager> BeliefSource for std::sync::Arc<kelpie_lease::LeaseKeeper<M>> {
    fn beliefs(&self) -> Vec<(ActorId, HeldBelief)> {
        kelpie_lease::LeaseKeeper::beliefs(self)
    }

    fn watch(&self, on_change: Box<dyn Fn() + Send + Sync>) {
        kelpie_lease::LeaseKeeper::watch_beliefs(self, on_change);
    }

    fn take_changed(&self, taken: &mut Vec<(ActorId, Option<HeldBelief>)>) {
        kelpie_lease::LeaseKeeper::take_changed_beliefs_into(self, taken);
    }
}

struct NodeEntry {
    clock: SimClock,
    keeper: Option<Rc<dyn BeliefSource>>,
    /// Set by the keeper's watcher when a belief changed.
    keeper_changed: Arc<AtomicBool>,
    /// Every belief must be re-read: the node started, crashed or its clock jumped.
    reread_all: bool,
    /// The node's beliefs as last taken. Only looked up and compared, never listed in its
    /// own order (changes are sorted before they are reported), so hashed: at 10,000 actors
    /// a sorted map's walk was a cache miss per level. A [`BeliefView`] (with the node's id)
    /// is built only for a belief that changed.
    views: ActorMap<Seen>,
    /// The keeper's changes as last taken: one buffer for every step.
    taken: Vec<(ActorId, Option<HeldBelief>)>,
}

/// Every node's beliefs, each with the node's clock. A keeper tells the board when its
/// beliefs change and which, so a step where no belief changed costs one flag read, and a
/// change costs a re-read of the actors it touched, not of all the node's beliefs.
#[derive(Clone, Default)]
pub struct BeliefBoard {
    /// By node id, ascending: the order nodes are visited in. A handful to a few dozen, looked
    /// up only when one (re)starts, crashes or jumps; walked on every step with a change,
    /// which a vector does for less than a tree's nodes.
    nodes: Rc<RefCell<Vec<(NodeId, NodeEntry)>>>,
    /// Set when any node may have changed since the last [`take_changes`](Self::take_changes).
    any_changed: Arc<AtomicBool>,
}

impl BeliefBoard {
    /// Registers (or, after a restart, replaces) the keeper holding a node's beliefs.
    pub fn set_keeper(&self, node_id: &NodeId, clock: SimClock, keeper: Rc<dyn BeliefSource>) {
        let keeper_changed = Arc::new(AtomicBool::new(false));
        let (flag, any) = (Arc::clone(&keeper_changed), Arc::clone(&self.any_changed));
        keeper.watch(Box::new(move || {
            flag.store(true, Ordering::Relaxed);
            any.store(true, Ordering::Relaxed);
        }));
        let entry = NodeEntry {
            clock,
            keeper: Some(keeper),
            keeper_changed,
            reread_all: true,
            views: ActorMap::default(),
            taken: Vec::new(),
        };
        let mut nodes = self.nodes.borrow_mut();
        match nodes.binary_search_by(|(id, _)| id.cmp(node_id)) {
            Ok(at) => nodes[at].1 = entry,
            Err(at) => nodes.insert(at, (node_id.clone(), entry)),
        }
        drop(nodes);
        self.any_changed.store(true, Ordering::Relaxed);
    }

    /// The node crashed: its memory, and so every belief, is gone.
    pub fn crashed(&self, node_id: &NodeId) {
        self.with_node(node_id, |node| node.keeper = None);
    }

    /// The node's clock jumped: its beliefs end at other global instants now.
    pub fn clock_jumped(&self, node_id: &NodeId) {
        self.with_node(node_id, |_| {});
    }

    /// Whether [`take_changes`](Self::take_changes) may return anything: one flag read.
    pub(crate) fn has_changes(&self) -> bool {
        self.any_changed.load(Ordering::Relaxed)
    }

    /// Re-reads what may have changed and hands `visit` each actor whose view differs, with
    /// its node and its view now (`None`: no belief in force), node by node. Cheap when
    /// nothing changed: one flag read.
    pub(crate) fn take_changes(&self, mut visit: impl FnMut(&NodeId, ActorId, Option<BeliefView>)) {
        // A plain load on the common path (nothing changed): no read-modify-write per step.
        if !self.has_changes() {
            return;
        }
        self.any_changed.store(false, Ordering::Relaxed);
        for (node_id, node) in self.nodes.borrow_mut().iter_mut() {
            let keeper_changed = node.keeper_changed.load(Ordering::Relaxed);
            if keeper_changed {
                node.keeper_changed.store(false, Ordering::Relaxed);
            }
            if !keeper_changed && !node.reread_all {
                continue;
            }
            match node.reread_all {
                true => {
                    for (actor_id, view) in node.reread_all_views(node_id) {
                        visit(node_id, actor_id, view);
                    }
                }
                false => node
                    .reread_changed_views(node_id, |actor_id, view| visit(node_id, actor_id, view)),
            }
            node.reread_all = false;
        }
    }

    fn with_node(&self, node_id: &NodeId, change: impl FnOnce(&mut NodeEntry)) {
        let mut nodes = self.nodes.borrow_mut();
        let at = (nodes.binary_search_by(|(id, _)| id.cmp(node_id))).expect("node registered");
        let node = &mut nodes[at].1;
        change(node);
        node.reread_all = true;
        self.any_changed.store(true, Ordering::Relaxed);
    }
}

/// A node's belief in one actor as the board last saw it: what [`BeliefView`] says beside
/// the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    held: HeldBelief,
    until_global_ms: u64,
}

impl Seen {
    fn view(self, node_id: &NodeId) -> BeliefView {
        BeliefView {
            node_id: node_id.clone(),
            held: self.held,
            until_global_ms: self.until_global_ms,
        }
    }
}

impl NodeEntry {
    fn seen(&self, held: HeldBelief) -> Seen {
        Seen {
            held,
            until_global_ms: self.clock.global_when_local_reaches(held.until_local_ms),
        }
    }

    /// Every belief afresh; returns the actors whose views differ from the last ones.
    fn reread_all_views(&mut self, node_id: &NodeId) -> Vec<(ActorId, Option<BeliefView>)> {
        let held: Vec<(ActorId, HeldBelief)> = match &self.keeper {
            Some(keeper) => {
                // Drained too: every belief is read below.
                keeper.take_changed(&mut self.taken);
                self.taken.clear();
                keeper.beliefs()
            }
            None => Vec::new(),
        };
        let after: ActorMap<Seen> = held
            .into_iter()
            .map(|(actor_id, held)| (actor_id, self.seen(held)))
            .collect();
        let before = std::mem::replace(&mut self.views, after);
        let mut changed: BTreeSet<&ActorId> = before
            .iter()
            .filter(|(actor_id, seen)| self.views.get(*actor_id) != Some(seen))
            .map(|(actor_id, _)| actor_id)
            .collect();
        changed.extend(self.views.keys().filter(|a| !before.contains_key(*a)));
        changed
            .into_iter()
            .map(|actor_id| {
                let view = self.views.get(actor_id).map(|seen| seen.view(node_id));
                (actor_id.clone(), view)
            })
            .collect()
    }

    /// Only the beliefs the keeper reported changed: hands `visit` those whose views differ.
    fn reread_changed_views(
        &mut self,
        node_id: &NodeId,
        mut visit: impl FnMut(ActorId, Option<BeliefView>),
    ) {
        let Some(keeper) = &self.keeper else {
            return;
        };
        let mut taken = std::mem::take(&mut self.taken);
        keeper.take_changed(&mut taken);
        for (actor_id, held) in taken.drain(..) {
            let after = held.map(|held| self.seen(held));
            // Replaced in place where the actor has an entry, so its key is not cloned again.
            let changed = match (after, self.views.get_mut(&actor_id)) {
                (Some(after), Some(before)) => std::mem::replace(before, after) != after,
                (Some(after), None) => self.views.insert(actor_id.clone(), after).is_none(),
                (None, Some(_)) => self.views.swap_remove(&actor_id).is_some(),
                (None, None) => false,
            };
            if changed {
                visit(actor_id, after.map(|seen| seen.view(node_id)));
            }
        }
        self.taken = taken;
    }
}
