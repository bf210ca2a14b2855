//! BeliefConsistency: a node that believes it holds a lease does hold it, on the store's clock.

use super::{Invariant, LeaseWorld};

/// Every belief in force is backed by the store: same holder, same token, and the belief ends
/// no later than the store's expiry. The last part is checked on the belief's end instant, not
/// just now, so a belief that would outlive the store's truth is caught the moment it starts.
#[derive(Debug, Default)]
pub struct BeliefConsistency;

impl Invariant for BeliefConsistency {
    fn name(&self) -> &'static str {
        "BeliefConsistency"
    }

    fn check(&mut self, world: &LeaseWorld<'_>) -> Result<(), String> {
        for (_, actor_id, actor) in world.changed_actors() {
            for view in actor.beliefs_held(world.store_now_ms) {
                let record = actor.record.as_ref();
                let backed = record.is_some_and(|r| {
                    r.holder.as_ref() == Some(&view.node_id)
                        && r.fencing_token == view.held.fencing_token
                        && view.until_global_ms <= r.expires_at_ms
                });
                if !backed {
                    return Err(format!(
                        "{} believes it holds {} with token {} until {} ms, but at {} ms the \
                         store has {:?}",
                        view.node_id,
                        actor_id,
                        view.held.fencing_token,
                        view.until_global_ms,
                        world.store_now_ms,
                        record
                    ));
                }
            }
        }
        Ok(())
    }
}
