//! LeaseUniqueness: at most one node believes it holds a valid lease on an actor.

use super::{Invariant, LeaseWorld};

/// At most one node believes it holds each actor's lease, at every instant. Beliefs only end
/// between changes, so checking the changed actors at each step covers every instant.
#[derive(Debug, Default)]
pub struct LeaseUniqueness;

impl Invariant for LeaseUniqueness {
    fn name(&self) -> &'static str {
        "LeaseUniqueness"
    }

    fn check(&mut self, world: &LeaseWorld<'_>) -> Result<(), String> {
        for (_, actor_id, view) in world.changed_actors() {
            let mut believers = view.beliefs_held(world.store_now_ms);
            let Some(first) = believers.next() else {
                continue;
            };
            if let Some(other) = believers.find(|b| b.node_id != first.node_id) {
                return Err(format!(
                    "{} (token {}, until {} ms) and {} (token {}, until {} ms) both believe they \
                     hold {actor_id}",
                    first.node_id,
                    first.held.fencing_token,
                    first.until_global_ms,
                    other.node_id,
                    other.held.fencing_token,
                    other.until_global_ms
                ));
            }
        }
        Ok(())
    }
}
