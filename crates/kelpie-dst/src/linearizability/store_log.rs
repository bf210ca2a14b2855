//! A linearization proposed by the store's own log, checked and never trusted.
//!
//! The simulated store can log every request it applied, in the order it applied them, with
//! the instant and the reply of each ([`StoreEffect`]). Read against the history, that log is a
//! candidate linearization: each logged effect is paired with the operation that sent it, an
//! answered one if the logged reply is the one its node saw, else an unseen effect of the same
//! request (an unanswered operation, or a duplicate delivery) whose window is still open. The
//! log's replies are taken only for the pairing (`decide` is not run twice per effect): the
//! candidate is then checked like a linearization the search found
//! ([`Witness::verify`]): every answered operation exactly once, within its interval, with its
//! reply; every unseen effect a distinct one, within its window, and writing; instants never
//! going back. If it passes, the history is linearizable: a linearization is its own proof,
//! wherever it came from.
//!
//! If it does not pass (a store that decided on a stale record or wrote something else, a log
//! that misses a request, a pairing this greedy reading got wrong), nothing is concluded and
//! the search runs as it would without a log; only the search reports a violation. So the
//! verdict never depends on the log, only the time it takes: a correct store's history is
//! checked in one replay instead of a search.

use kelpie_core::ActorId;
use kelpie_lease::backend::LeaseRequest;
use kelpie_lease::{Lease, LeaseError};

use super::actor::ActorHistory;
use super::search::{Placed, Witness};
use super::zone::ms;
use super::{prefetch, PREFETCH_AHEAD};

/// One request the store applied, in the order it applied them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEffect {
    /// The actor.
    pub actor_id: ActorId,
    /// The request as the store received it.
    pub request: LeaseRequest,
    /// The store's clock when it decided.
    pub store_now_ms: u64,
    /// The version of the actor's record the store decided on: how many writes to it had
    /// landed. A decision's write landed if the actor's next effect saw a later version (a
    /// write can fail after the decision; the last effect's is taken to have landed).
    pub record_version: u64,
    /// The reply the store decided on (the node saw it if the write, if any, landed and the
    /// answer arrived). The proposal pairs the effect with an operation by it; whether it is
    /// the reply `decide` gives there, the replay checks.
    pub reply: Result<Lease, LeaseError>,
    /// Whether the store's decision wrote the record.
    pub wrote: bool,
}

/// Whether `effects` (one actor's, in the store's order) read as a linearization of `history`
/// that [`Witness::verify`] accepts.
pub(super) fn witnesses(history: &ActorHistory<'_>, effects: &[&StoreEffect]) -> bool {
    propose(history, effects).is_some_and(|witness| witness.verify().is_ok())
}

/// The linearization `effects` propose, or `None` where they cannot be read as one.
fn propose<'h, 'a>(
    history: &'h ActorHistory<'a>,
    effects: &[&StoreEffect],
) -> Option<Witness<'h, 'a>> {
    let definite = &history.definite;
    let start_ms = ms(history.start.t_max_ms);
    let mut steps = Vec::with_capacity(definite.len() + 1);
    let mut instants = Vec::with_capacity(definite.len() + 2);
    steps.push(Placed::Start);
    instants.extend([0, start_ms]);
    let mut placed = vec![false; definite.len()];
    // Every answered operation before this one is placed.
    let mut first_open = 0;
    // Per kind, its first member not used yet (members are used in invocation order, as in
    // the search: their windows have one length).
    let mut next_member = vec![0; history.kinds.len()];
    for (at, effect) in effects.iter().enumerate() {
        if let Some(&ahead) = effects.get(at + PREFETCH_AHEAD) {
            prefetch(ahead);
        }
        let landed = effects
            .get(at + 1)
            .is_none_or(|next| next.record_version != effect.record_version);
        let t_ms = ms(effect.store_now_ms);
        while first_open < definite.len() && placed[first_open] {
            first_open += 1;
        }
        // An answered operation must take effect before its response: past it, no pairing of
        // the rest of the log can place it.
        if definite
            .get(first_open)
            .is_some_and(|op| op.responded_ms < t_ms)
        {
            return None;
        }
        let request = &effect.request;
        if effect.wrote && !landed {
            // The write failed: the request changed nothing, and its node got an error.
            continue;
        }
        // Of the operations this effect can answer (the same request, the same reply), the one
        // whose response came first: the others can still be answered by a later effect.
        let answered = (first_open..definite.len())
            .take_while(|&index| definite[index].invoked_ms <= t_ms)
            .filter(|&index| {
                let op = &definite[index];
                !placed[index]
                    && t_ms <= op.responded_ms
                    && op.op.request == *request
                    && op.op.reply() == Some(&effect.reply)
            })
            .min_by_key(|&index| (definite[index].responded_ms, index));
        match answered {
            Some(index) => {
                placed[index] = true;
                steps.push(Placed::Definite(index));
            }
            // Unseen, an effect that writes nothing leaves no trace: it is left out.
            None if !effect.wrote => continue,
            None => {
                let kind = history
                    .kinds
                    .iter()
                    .position(|kind| kind.request == request)?;
                let members = &history.kinds[kind].members;
                let member = history.first_open(members, next_member[kind], t_ms);
                if members
                    .get(member)
                    .is_none_or(|&invoked_ms| invoked_ms > t_ms)
                {
                    return None;
                }
                next_member[kind] = member + 1;
                steps.push(Placed::Unseen { kind, member });
            }
        }
        instants.push(t_ms);
    }
    Some(Witness::proposed(history, steps, instants))
}
