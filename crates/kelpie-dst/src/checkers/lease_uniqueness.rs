//! LeaseUniqueness: at most one node believes it holds a valid lease on an actor.

use kelpie_lease::backend::LeaseOp;

use super::{Invariant, LeaseWorld};

/// At most one node believes it holds each actor's lease, at every instant. Beliefs only end
/// between changes, so checking the changed actors at each step covers every instant.
///
/// And the store's side of it: no acquire is granted to a node while the record the store
/// decided on names another valid holder. The beliefs alone miss a store that hands a lease
/// on a little early, while the holder's belief (ended early by its drift margin) is already
/// over: it breaks the promise the store made the holder, and only the margin hides it.
#[derive(Debug, Default)]
pub struct LeaseUniqueness;

impl Invariant for LeaseUniqueness {
    fn name(&self) -> &'static str {
        "LeaseUniqueness"
    }

    fn check(&mut self, world: &LeaseWorld<'_>) -> Result<(), String> {
        for d in world.decisions {
            if d.request.op != LeaseOp::Acquire || d.decision.reply.is_err() {
                continue;
            }
            let holder = d
                .before
                .as_ref()
                .and_then(|b| b.valid_holder(d.store_now_ms));
            if let Some(holder) = holder.filter(|h| **h != d.request.node_id) {
                return Err(format!(
                    "acquire of {} by {} granted at store time {} ms while {holder} held it \
                     until {} ms",
                    d.actor_id,
                    d.request.node_id,
                    d.store_now_ms,
                    d.before.as_ref().map_or(0, |b| b.expires_at_ms)
                ));
            }
        }
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
