//! BeliefConsistency: a node that believes it holds a lease does hold it, on the store's clock.

use super::{Invariant, LeaseWorld};

/// Every belief is backed by the store: same holder, same token, not yet expired.
#[derive(Debug, Default)]
pub struct BeliefConsistency;

impl Invariant for BeliefConsistency {
    fn name(&self) -> &'static str {
        "BeliefConsistency"
    }

    fn check(&mut self, world: &LeaseWorld<'_>) -> Result<(), String> {
        for view in world.beliefs {
            let record = world.records.get(&view.actor_id);
            let backed = record.is_some_and(|r| {
                r.valid_holder(world.store_now_ms) == Some(&view.node_id)
                    && r.fencing_token == view.held.fencing_token
            });
            if !backed {
                return Err(format!(
                    "{} believes it holds {} with token {} until local {} ms (local now {} ms), \
                     but at store time {} ms the store has {:?}",
                    view.node_id,
                    view.actor_id,
                    view.held.fencing_token,
                    view.held.until_local_ms,
                    view.node_now_ms,
                    world.store_now_ms,
                    record
                ));
            }
        }
        Ok(())
    }
}
