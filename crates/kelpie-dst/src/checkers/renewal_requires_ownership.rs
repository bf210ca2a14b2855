//! RenewalRequiresOwnership: only the holder of an unexpired lease extends it.

use kelpie_lease::{backend::LeaseOp, backend::LeaseRecord};

use super::{Invariant, LeaseWorld};

/// Checked twice: on every renewal the store decided to grant (the requester held the
/// unexpired lease it saw with the token it sent, and the token stayed), and on the store's truth between steps (an
/// expiry that moved later, with the holder and token unchanged, was on an unexpired lease).
#[derive(Debug, Default)]
pub struct RenewalRequiresOwnership {
    /// Each actor's record at the previous change, by its index in [`LeaseWorld::actors`].
    previous: Vec<Option<LeaseRecord>>,
}

impl Invariant for RenewalRequiresOwnership {
    fn name(&self) -> &'static str {
        "RenewalRequiresOwnership"
    }

    fn check(&mut self, world: &LeaseWorld<'_>) -> Result<(), String> {
        for d in world
            .decisions
            .iter()
            .filter(|d| d.request.op == LeaseOp::Renew)
        {
            let Ok(lease) = &d.decision.reply else {
                continue;
            };
            // The request's token, where it carries one, must be the lease's: a renewal from
            // an earlier tenure of the same holder id extends nothing.
            let owned = d.before.as_ref().is_some_and(|b| {
                b.valid_holder(d.store_now_ms) == Some(&d.request.node_id)
                    && b.fencing_token == lease.fencing_token
                    && d.request.fencing_token.is_none_or(|t| t == b.fencing_token)
            });
            if !owned {
                return Err(format!(
                    "renewal of {} by {} granted at store time {} ms over {:?}",
                    d.actor_id, d.request.node_id, d.store_now_ms, d.before
                ));
            }
        }
        for (index, actor_id, view) in world.changed_actors() {
            let Some(now) = &view.record else {
                continue;
            };
            if self.previous.len() <= index {
                self.previous.resize(index + 1, None);
            }
            let before = self.previous[index].replace(now.clone());
            let Some(before) = before else { continue };
            let extended = now.holder.is_some()
                && now.holder == before.holder
                && now.fencing_token == before.fencing_token
                && now.expires_at_ms > before.expires_at_ms;
            if extended && before.expires_at_ms <= world.store_now_ms && !world.held_until_deleted {
                return Err(format!(
                    "lease on {actor_id} was extended after it expired: {before:?} -> {now:?} \
                     at store time {} ms",
                    world.store_now_ms
                ));
            }
        }
        Ok(())
    }
}
