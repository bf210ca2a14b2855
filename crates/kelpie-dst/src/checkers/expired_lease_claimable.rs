//! ExpiredLeaseClaimable: an expired or free lease never blocks an acquire.

use kelpie_lease::backend::LeaseOp;

use super::{Invariant, LeaseWorld};

/// Every acquire the store decided on a record with no valid holder was granted to the
/// requester.
#[derive(Debug, Default)]
pub struct ExpiredLeaseClaimable;

impl Invariant for ExpiredLeaseClaimable {
    fn name(&self) -> &'static str {
        "ExpiredLeaseClaimable"
    }

    fn check(&mut self, world: &LeaseWorld<'_>) -> Result<(), String> {
        for d in world
            .decisions
            .iter()
            .filter(|d| d.request.op == LeaseOp::Acquire)
        {
            let claimable = d
                .before
                .as_ref()
                .is_none_or(|b| b.valid_holder(d.store_now_ms).is_none());
            // A grant is a reply naming the requester and, where the store writes through
            // the decision (not etcd's, whose decisions are read off its transactions), a
            // write that does too: a reply alone leaves the lease where it was.
            let written = world.held_until_deleted
                || d.decision
                    .write
                    .as_ref()
                    .is_some_and(|w| w.holder.as_ref() == Some(&d.request.node_id));
            let granted = written
                && d.decision
                    .reply
                    .as_ref()
                    .is_ok_and(|l| l.holder == d.request.node_id);
            if claimable && !granted {
                return Err(format!(
                    "acquire of {} by {} at store time {} ms was not granted although the \
                     lease was free or expired ({:?}): {:?}",
                    d.actor_id, d.request.node_id, d.store_now_ms, d.before, d.decision.reply
                ));
            }
        }
        Ok(())
    }
}
