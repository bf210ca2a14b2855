//! LeaseUniqueness: at most one node believes it holds a valid lease on an actor.

use std::collections::BTreeMap;

use kelpie_core::{ActorId, NodeId};

use super::{Invariant, LeaseWorld};

/// At most one node believes it holds each actor's lease, at every instant.
#[derive(Debug, Default)]
pub struct LeaseUniqueness;

impl Invariant for LeaseUniqueness {
    fn name(&self) -> &'static str {
        "LeaseUniqueness"
    }

    fn check(&mut self, world: &LeaseWorld<'_>) -> Result<(), String> {
        let mut believers: BTreeMap<&ActorId, &NodeId> = BTreeMap::new();
        for view in world.beliefs {
            if let Some(other) = believers.insert(&view.actor_id, &view.node_id) {
                if other != &view.node_id {
                    return Err(format!(
                        "{} and {} both believe they hold {} (token {} until local {} ms)",
                        other,
                        view.node_id,
                        view.actor_id,
                        view.held.fencing_token,
                        view.held.until_local_ms
                    ));
                }
            }
        }
        Ok(())
    }
}
