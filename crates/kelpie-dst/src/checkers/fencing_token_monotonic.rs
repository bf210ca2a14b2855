//! FencingTokenMonotonic: an actor's token never goes down, and every new holder's is larger
//! than every token issued before for that actor.

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::backend::LeaseOp;

use super::{Invariant, LeaseWorld};

/// Tracks, per actor, the highest token the store ever held and who held it.
#[derive(Debug, Default)]
pub struct FencingTokenMonotonic {
    /// By the actor's index in [`LeaseWorld::actors`].
    highest: Vec<Option<(FencingToken, Option<NodeId>)>>,
}

impl FencingTokenMonotonic {
    fn observe(
        &mut self,
        index: usize,
        actor_id: &ActorId,
        token: FencingToken,
        holder: Option<&NodeId>,
    ) -> Result<(), String> {
        if self.highest.len() <= index {
            self.highest.resize(index + 1, None);
        }
        let slot = &mut self.highest[index];
        let Some((highest, highest_holder)) = slot.as_ref() else {
            *slot = Some((token, holder.cloned()));
            return Ok(());
        };
        let highest = *highest;
        if token < highest {
            return Err(format!(
                "token of {actor_id} went back from {highest} to {token}"
            ));
        }
        let new_holder = holder.is_some() && holder != highest_holder.as_ref();
        if token == highest && new_holder {
            return Err(format!(
                "{actor_id} passed from {highest_holder:?} to {holder:?} with the same token \
                 {token}"
            ));
        }
        // A released record (no holder) is remembered as such: whoever holds the lease next,
        // its former holder too, is a new holder and must bring a larger token.
        if token > highest || new_holder || holder.is_none() {
            *slot = Some((token, holder.cloned()));
        }
        Ok(())
    }
}

impl Invariant for FencingTokenMonotonic {
    fn name(&self) -> &'static str {
        "FencingTokenMonotonic"
    }

    fn check(&mut self, world: &LeaseWorld<'_>) -> Result<(), String> {
        // A decision may be lost to a write fault, so decisions are judged against the record
        // they saw, and the running maximum follows only the store's truth.
        for d in world.decisions {
            let Some(written) = &d.decision.write else {
                continue;
            };
            let before_token = d
                .before
                .as_ref()
                .map_or(FencingToken::ZERO, |b| b.fencing_token);
            let before_holder = d
                .before
                .as_ref()
                .and_then(|b| b.valid_holder(d.store_now_ms));
            let new_holder = written.holder.is_some() && written.holder.as_ref() != before_holder;
            // A grant hands its holder the token written: a reply with another would fence
            // by a token the store does not hold.
            let handed_other = matches!(d.request.op, LeaseOp::Acquire | LeaseOp::Renew)
                && d.decision.reply.as_ref().is_ok_and(|lease| {
                    lease.fencing_token != written.fencing_token
                        || written.holder.as_ref() != Some(&lease.holder)
                });
            let wrong = if handed_other {
                format!("({:?}) but replied {:?}", written.holder, d.decision.reply)
            } else if written.fencing_token < before_token
                || (new_holder && written.fencing_token <= before_token)
            {
                format!("over token {before_token}")
            } else {
                continue;
            };
            return Err(format!(
                "{} on {} by {} wrote token {} {wrong} at store time {} ms",
                d.request.op.name(),
                d.actor_id,
                d.request.node_id,
                written.fencing_token,
                d.store_now_ms
            ));
        }
        for (index, actor_id, view) in world.changed_actors() {
            if let Some(record) = &view.record {
                self.observe(
                    index,
                    actor_id,
                    record.fencing_token,
                    record.holder.as_ref(),
                )?;
            }
        }
        Ok(())
    }
}
