//! A Wing–Gong linearizability checker for lease histories, with real time.
//!
//! The sequential model is the lease store itself: one record per actor and the store's clock,
//! with [`decide`](kelpie_lease::backend::decide) as the transition. A history is linearizable if its
//! effects can be put in one order, each at one store instant, instants never going back along
//! the order, such that:
//! - every answered operation takes effect exactly once, within its interval (from invocation
//!   to response), and gets exactly the reply `decide` gives at that instant on the record left
//!   by the effects before it;
//! - an operation whose outcome the node never learned (timeout, store failure, crash) takes
//!   effect at most once, at any instant after its invocation;
//! - where the network can duplicate messages ([`Duplicates::Possible`]), every request may
//!   take effect once more, unseen, at any instant after its invocation (the protocol is built
//!   for it: acquire is idempotent, renew and release carry the token). Where it cannot, there
//!   is no such second effect;
//! - where the environment bounds how long a request can travel before the store applies it
//!   ([`Delivery::effect_within_ms`]: the simulator's network and storage latencies, spikes
//!   included), every effect takes place within that bound of its invocation. Without a bound
//!   an unseen effect may come arbitrarily late, and each one nobody observed multiplies the
//!   orders the search must try; with it, only the effects of the last moments are open.
//!
//! Leases on different actors are independent, so the history is split per actor and each part
//! is checked alone (P-compositionality).
//!
//! # The search
//!
//! Depth-first over the effect that goes next (Wing and Gong): any answered operation that no
//! unplaced one precedes in real time, or the next unused effect of any request nobody saw the
//! reply of. Instants are not chosen but kept symbolic (`zone.rs`): every timing rule of the
//! model (within the interval, no earlier than the last effect, before every unplaced
//! operation's response, `now < expires`, `max(now + duration, expires)`, a reply naming an
//! instant) is a difference constraint, so the instants consistent with a path form a zone of a
//! difference-bound matrix over the three instants the future depends on: the last effect's,
//! the record's acquisition and its expiry. `model.rs` is `decide` split into the cases it tells
//! apart by comparing instants; holders, tokens and renewal counts stay concrete.
//!
//! **Sound**: an accepted history has a linearization whose every step is a case of `decide`
//! under constraints that hold together (the zone is exact: a closed matrix projects exactly),
//! and the checker does not take the model's word for it: it solves the path's constraints for
//! concrete instants and replays them through `decide`, panicking if any reply differs. An
//! unseen effect can only go where its instant can: after its invocation, no earlier than the
//! effects before it in the order, and before the response of every answered operation after
//! it, so it can never explain a reply that came before it (the checker this one replaced
//! placed such effects at their invocation instant, behind operations already placed later,
//! and accepted two concurrent holders).
//!
//! **Complete**: every linearization is a sequence of steps the search takes, each unseen
//! effect exactly where it goes in it, with every instant it may have (nothing is decided
//! eagerly: an answered operation is not pinned to its earliest instant, so an unseen effect
//! placed after it can still come before it in time when the constraints let it). The only
//! pruning is by necessary conditions: an effect that cannot change the record is never placed
//! unseen (it would only move time on); a renewal or release whose token has passed can never
//! write again; tokens never go down, so a state whose token exceeds one a remaining reply
//! names is dead; and a state is skipped if one with the same operations placed and the same
//! record was explored with a zone that includes its zone and no more unseen effects used
//! (Lowe's memoisation with dominance: whatever the skipped state could do, that one could).
//!
//! The search runs twice at most. First with unseen effects placed only where an operation
//! that may go next does not fit, and only effects that may help it (by a node its reply names
//! or by its own node, releases, acquires while its reply names a later token): on the
//! histories of a correct store this finds a linearization in a few hundred states where the
//! exhaustive search can wander through millions of combinations of unseen effects that nobody
//! observes. It is exact, so what it finds is a linearization; but it may miss one (an unseen
//! effect that must precede an answered operation that does not see it, say). So if it finds
//! none, the exhaustive search above runs, and only it reports a violation.
//!
//! # The store's log
//!
//! A simulated store can log what it decided ([`StoreEffect`]: each request, at its instant, in
//! its order, with the version of the record it decided on and the reply it decided).
//! [`check_history_with_store_log`]
//! first reads that log, actor by actor, as a proposed linearization (`store_log.rs`), and
//! checks it as it checks one the search found: replayed through `decide`, every answered
//! operation exactly once, within its interval, with its reply; every unseen effect a distinct
//! one, within its window, and writing; instants never going back. A proposal that passes is a
//! linearization, so that actor needs no search. One that does not (a store that decided on a
//! stale record or wrote something else, a write that failed, a log that is wrong) proves
//! nothing, and the actor is searched as without a log. Only the search reports a violation,
//! so the verdict is the same with any log or none; the log saves the search's time on a
//! correct store's history (in the swarm, about 20% of a run's instructions).
//!
//! The search gives up with [`LinearizabilityError::SearchBound`] after
//! [`LINEARIZABILITY_SEARCH_STATES_MAX`] states. When a history fails, `report.rs` narrows it
//! to the smallest offending window; if a search of the narrowing gives up, the window is the
//! whole history and the verdict stays [`LinearizabilityError::NotLinearizable`].

mod actor;
mod model;
mod report;
mod search;
mod store_log;
#[cfg(test)]
mod tests;
mod zone;

use std::fmt;

use kelpie_core::ActorId;

use crate::history::HistoryOp;
use actor::{ActorHistory, Start};

pub use report::OFFENDING_WINDOW_STARTS_TRIED_MAX;
pub use store_log::StoreEffect;

/// Most search states explored for one actor before the check gives up with
/// [`LinearizabilityError::SearchBound`].
pub const LINEARIZABILITY_SEARCH_STATES_MAX: u64 = 2_000_000;

/// Whether the network could deliver a request to the store twice (a run whose fault mix
/// includes [`kelpie_sim::FaultType::NetworkDuplicate`]). Only then may a request take effect a
/// second time, unseen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicates {
    /// Every request reached the store at most once.
    Impossible,
    /// A request may have reached the store twice.
    Possible,
}

impl Duplicates {
    /// [`Duplicates::Possible`] if `possible`.
    pub fn possible_if(possible: bool) -> Self {
        if possible {
            Duplicates::Possible
        } else {
            Duplicates::Impossible
        }
    }
}

/// What the environment guaranteed about the delivery of requests to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Whether a request may have reached the store twice.
    pub duplicates: Duplicates,
    /// Every request that takes effect does so within this many ms of its invocation (the
    /// longest network delivery plus the longest storage request latency); `None`: at any time
    /// after it.
    pub effect_within_ms: Option<u64>,
}

impl From<Duplicates> for Delivery {
    /// No bound on when a request takes effect.
    fn from(duplicates: Duplicates) -> Self {
        Delivery {
            duplicates,
            effect_within_ms: None,
        }
    }
}

/// What a successful check covered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinearizabilityReport {
    /// Actors whose histories were checked.
    pub actors_checked: usize,
    /// Operations checked.
    pub operations_checked: usize,
    /// Of those, operations whose outcome the node never learned.
    pub unknown_operations: usize,
    /// Search states explored in all.
    pub states_explored: u64,
    /// Of the actors checked, those whose history the store's log linearized, checked by one
    /// replay with no search (see [`check_history_with_store_log`]).
    pub actors_linearized_by_store_log: usize,
}

/// Why a history failed the check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinearizabilityError {
    /// No linearization exists.
    #[error(
        "linearizability violation on {actor_id}: no order of its lease operations, each \
         taking effect at one store instant within its interval, gives the replies the nodes \
         saw from the sequential lease store; {window}"
    )]
    NotLinearizable {
        /// The actor whose history is not linearizable.
        actor_id: ActorId,
        /// The smallest part of its history found to be non-linearizable already.
        window: OffendingWindow,
    },
    /// An operation's answer came before its request: not a history any run records (the
    /// recorder's times are one clock's), so the history was built wrong.
    #[error(
        "malformed history: operation {index} on {actor_id} responded at {responded_ms} ms, \
         before it was invoked at {invoked_ms} ms"
    )]
    MalformedHistory {
        /// The operation's index in the history.
        index: usize,
        /// Its actor.
        actor_id: ActorId,
        /// When it was invoked.
        invoked_ms: u64,
        /// When it responded.
        responded_ms: u64,
    },
    /// The search explored [`LINEARIZABILITY_SEARCH_STATES_MAX`] states without an answer.
    #[error(
        "linearizability check of {actor_id} gave up after {states_explored} search states \
         (LINEARIZABILITY_SEARCH_STATES_MAX) on {operations} operations, without an answer"
    )]
    SearchBound {
        /// The actor whose history was too hard.
        actor_id: ActorId,
        /// Its operations.
        operations: usize,
        /// States explored.
        states_explored: u64,
    },
}

/// The smallest offending window found: a part of one actor's history that is already not
/// linearizable, from a known starting record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffendingWindow {
    /// Global time of the window's first invocation.
    pub from_ms: u64,
    /// Global time of the response that makes it non-linearizable.
    pub to_ms: u64,
    /// What the window starts from.
    pub start: String,
    /// The operation no linearization of the window gets past, if the search found one.
    pub stuck_at: Option<String>,
    /// The window's operations, each with its index in the history, in invocation order.
    pub operations: Vec<(usize, String)>,
    /// Operations in the actor's whole history.
    pub history_operations: usize,
}

impl fmt::Display for OffendingWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "smallest offending window: {} of the actor's {} operations, {} ms .. {} ms, \
             starting {}",
            self.operations.len(),
            self.history_operations,
            self.from_ms,
            self.to_ms,
            self.start
        )?;
        if let Some(stuck_at) = &self.stuck_at {
            write!(f, "; no linearization gets past {stuck_at}")?;
        }
        for (index, op) in &self.operations {
            write!(f, "\n  #{index} {op}")?;
        }
        Ok(())
    }
}

/// Checks every actor's part of `ops` (in any order) and returns what was checked, or the
/// first actor (in actor id order) whose history is not linearizable. `delivery` says whether
/// the network could have delivered a request twice, and how late a request may take effect
/// (a bare [`Duplicates`] bounds nothing).
///
/// The model's own calls to [`decide`](kelpie_lease::backend::decide) would count as coverage marks of
/// the store, so the check runs with marking suspended: a sweep's coverage still says what the
/// store did, and the check costs the same however many marks the thread has counted before.
pub fn check_history(
    ops: &[HistoryOp],
    delivery: impl Into<Delivery>,
) -> Result<LinearizabilityReport, LinearizabilityError> {
    let delivery = delivery.into();
    kelpie_core::coverage::suspended(|| check_actors(ops, delivery, None))
}

/// [`check_history`], first trying for each actor the linearization the store's log proposes:
/// `effects` are the requests the store applied, in its order, at its instants (see
/// [`StoreEffect`]). Where that proposal is a linearization (checked as the search's are, by
/// replaying it through `decide`), the actor needs no search; where it is not, or the log is
/// incomplete or wrong, the actor is searched as [`check_history`] does. The verdict is the
/// same with any log, or none: a log only saves time.
pub fn check_history_with_store_log(
    ops: &[HistoryOp],
    delivery: impl Into<Delivery>,
    effects: &[StoreEffect],
) -> Result<LinearizabilityReport, LinearizabilityError> {
    let delivery = delivery.into();
    kelpie_core::coverage::suspended(|| check_actors(ops, delivery, Some(effects)))
}

/// How many operations ahead [`prefetch`] is asked for: far enough for a fetch from memory to
/// arrive before its operation is reached, near enough not to evict what is still in use.
const PREFETCH_AHEAD: usize = 4;

/// Asks the CPU to bring `item` (an operation of the history, an effect of the store's log)
/// into cache ahead of its use. Each actor's part of a history, and of the store's log, is
/// spread across all of it (a swarm with 100 actors interleaves them), so reading one actor's
/// part missed the cache on almost every item: `ActorHistory::new` took 5% of a swarm's time
/// on 2% of its instructions, and the one line of the log's proposal that reads the next
/// effect 0.7%. A hint only: results never depend on it, and elsewhere than on x86_64 it does
/// nothing.
#[inline(always)]
fn prefetch<T>(item: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        const LINE_BYTES: usize = 64;
        let first = std::ptr::from_ref(item).cast::<i8>();
        let lines = (first as usize % LINE_BYTES + std::mem::size_of::<T>()).div_ceil(LINE_BYTES);
        for line in 0..lines {
            let address = first.wrapping_add(line * LINE_BYTES);
            // SAFETY: a prefetch is a hint: it reads nothing the program sees and faults on no
            // address, valid or not; `_mm_prefetch` needs only SSE, which every x86_64 has.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address);
            }
        }
    }
}

/// `items` grouped by actor, each group in the items' order. Hashed (a sorted map cost a tenth
/// of the check); sort the keys for actor order.
fn by_actor<'a, T>(
    items: impl IntoIterator<Item = (&'a ActorId, T)>,
) -> indexmap::IndexMap<&'a ActorId, Vec<T>, foldhash::fast::FixedState> {
    let mut groups: indexmap::IndexMap<_, Vec<T>, _> = indexmap::IndexMap::default();
    for (actor_id, item) in items {
        groups.entry(actor_id).or_default().push(item);
    }
    groups
}

fn check_actors(
    ops: &[HistoryOp],
    delivery: Delivery,
    effects: Option<&[StoreEffect]>,
) -> Result<LinearizabilityReport, LinearizabilityError> {
    let backwards = ops.iter().enumerate().find_map(|(index, op)| {
        let responded_ms = op.responded_ms()?;
        (responded_ms < op.invoked_ms).then_some((index, op, responded_ms))
    });
    if let Some((index, op, responded_ms)) = backwards {
        return Err(LinearizabilityError::MalformedHistory {
            index,
            actor_id: op.actor_id.clone(),
            invoked_ms: op.invoked_ms,
            responded_ms,
        });
    }
    let mut ops_by_actor = by_actor(
        ops.iter()
            .enumerate()
            .map(|(i, op)| (&op.actor_id, (i, op))),
    );
    ops_by_actor.sort_unstable_keys();
    let effects_by_actor =
        effects.map(|effects| by_actor(effects.iter().map(|effect| (&effect.actor_id, effect))));
    let mut report = LinearizabilityReport::default();
    for (actor_id, ops) in ops_by_actor {
        let history = ActorHistory::new(actor_id, &ops, u64::MAX, Start::empty(), delivery);
        report.actors_checked += 1;
        report.operations_checked += ops.len();
        report.unknown_operations += history.unanswered;
        if let Some(effects_by_actor) = &effects_by_actor {
            let logged = effects_by_actor
                .get(actor_id)
                .map_or(&[][..], Vec::as_slice);
            if store_log::witnesses(&history, logged) {
                report.actors_linearized_by_store_log += 1;
                continue;
            }
        }
        let outcome = search::check_actor(&history)?;
        report.states_explored += outcome.states_explored;
        if !outcome.linearizable {
            return Err(LinearizabilityError::NotLinearizable {
                actor_id: actor_id.clone(),
                window: report::offending_window(actor_id, &ops, delivery),
            });
        }
    }
    Ok(report)
}
