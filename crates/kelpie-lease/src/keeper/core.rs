//! The keeper's decisions as a pure state machine: local clock readings and the store's
//! replies go in, the requests to send and the events for the owner come out. It performs no
//! I/O and reads no clock; [`LeaseKeeper`](super::LeaseKeeper) is the thin async driver that
//! sends the requests through a [`LeaseManager`](crate::LeaseManager) and feeds the replies
//! back, on tokio in a process and on the simulator in tests.
//!
//! The inputs are the node-side actions of the TLA+ model (`docs/tla/KelpieLease.tla`):
//!
//! | input | TLA+ action |
//! |---|---|
//! | [`KeeperCore::begin_acquire`] | `SendAcquire` (refused while a release is unresolved: the model's guard that a re-acquire never races its own release) |
//! | [`KeeperCore::acquire_replied`] | `Receive` of an acquire reply (belief from the *send* time); a grant overtaken by a release of the actor is not believed (`overtaken`), and is released in turn once the raced release is answered: a release of a token the node was granted, decided by the store as any release, but not in the model, whose `SendRelease` needs a belief |
//! | [`KeeperCore::begin_release`], [`KeeperCore::begin_release_of`] | `SendRelease` (the belief ends first; `_of` only if the belief carries the given token) |
//! | [`KeeperCore::release_replied`] | `Receive` of a release reply |
//! | [`KeeperCore::poll`] | `BeliefExpires` for every belief that ran out, then `SendRenew` for every renewal due and `RetryRelease` for every unresolved release due |
//! | [`KeeperCore::renew_replied`] | `Receive` of a renewal reply |
//! | [`KeeperCore::expire`] | `BeliefExpires` while renewals hang (`Abandon`) |
//!
//! Safety argument: every grant or renewal believed is measured from the moment the request
//! was *sent*, on the node's clock, through the pure [`Belief`] state machine, which shortens
//! it by the drift bound and a safety margin. The store measures the same lease from the
//! moment it *applied* the request, which is later; so the belief ends before the store's
//! expiry whatever the delay and within the allowed drift.

use std::collections::{BTreeMap, BTreeSet};

use indexmap::IndexMap;

use kelpie_core::{ActorId, FencingToken};

use super::deadlines::Deadlines;
use super::{
    KeeperEvent, KeeperTiming, LostReason, MARK_BELIEF_ENDED, MARK_COMMIT_UNKNOWN_RESOLVED,
    MARK_RENEWAL_FAILED, MARK_RENEWAL_REFUSED, RELEASE_BACKOFF_INTERVALS_MAX,
};
use crate::belief::{Belief, BeliefConfig, HeldBelief};
use crate::error::{LeaseError, StoreError};
use crate::lease::{FencedOp, FencedRequest, Lease};

/// A request the driver must send to the store now, and report back with the same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeeperRequest {
    /// Renew the lease on `actor_id` if it still carries `fencing_token`; report the outcome
    /// to [`KeeperCore::renew_replied`] with `sent_local_ms`.
    Renew {
        /// The actor.
        actor_id: ActorId,
        /// The token the keeper believes it holds.
        fencing_token: FencingToken,
        /// The local time the request is sent at (the belief is measured from it).
        sent_local_ms: u64,
    },
    /// Release the lease on `actor_id` if it still carries `fencing_token` (a retry of a
    /// release the store has not answered); report to [`KeeperCore::release_replied`].
    Release {
        /// The actor.
        actor_id: ActorId,
        /// The token of the lease being released.
        fencing_token: FencingToken,
    },
}

impl KeeperRequest {
    /// The request as a manager's round carries it ([`crate::LeaseManager::fenced_round`]).
    pub fn fenced(&self) -> FencedRequest {
        let (op, actor_id, fencing_token) = match self {
            KeeperRequest::Renew {
                actor_id,
                fencing_token,
                ..
            } => (FencedOp::Renew, actor_id, fencing_token),
            KeeperRequest::Release {
                actor_id,
                fencing_token,
            } => (FencedOp::Release, actor_id, fencing_token),
        };
        FencedRequest {
            op,
            actor_id: actor_id.clone(),
            fencing_token: *fencing_token,
        }
    }

    /// The actor the request is about.
    pub fn actor_id(&self) -> &ActorId {
        match self {
            KeeperRequest::Renew { actor_id, .. } | KeeperRequest::Release { actor_id, .. } => {
                actor_id
            }
        }
    }
}

/// Coverage mark: an acquire's grant arrived after a release of the same actor was begun
/// concurrently, and was not believed.
pub const MARK_GRANT_OVERTAKEN_BY_RELEASE: &str = "keeper.grant_overtaken_by_release";

/// What [`KeeperCore::begin_acquire`] hands out and
/// [`KeeperCore::acquire_replied`] takes back: the actor's releases begun when the acquire was
/// sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcquireTicket {
    releases_begun: u64,
}

/// One held lease as the keeper tracks it.
#[derive(Debug, Clone, Copy)]
struct Held {
    belief: Belief,
    fencing_token: FencingToken,
    next_renew_local_ms: u64,
}

/// A release the store has not answered yet.
#[derive(Debug, Clone, Copy)]
struct PendingRelease {
    fencing_token: FencingToken,
    attempts: u32,
    next_attempt_local_ms: u64,
}

/// When each held lease and pending release next needs the keeper.
///
/// Held leases are named by their index in [`KeeperCore::held`], not by actor id: a renewal
/// reschedules two entries, and integers compare and copy for nothing where ids cost a
/// reference count each and compare their bytes on ties. The order within an instant is then
/// the map's, which no caller sees: each sorts what is due by actor.
#[derive(Debug, Default)]
struct Schedule {
    renewals: Deadlines,
    belief_ends: Deadlines,
    release_retries: BTreeSet<(u64, ActorId)>,
}

impl Schedule {
    /// Schedules held lease `index` (a new one, or a new state of it).
    fn hold(&mut self, index: usize, held: &Held) {
        self.renewals.set(index, held.next_renew_local_ms);
        self.belief_ends.set(index, held.until_local_ms());
    }

    /// Unschedules held lease `index`.
    fn unhold(&mut self, index: usize) {
        let renewal = self.renewals.remove(index);
        let end = self.belief_ends.remove(index);
        assert!(renewal && end, "a held lease is scheduled once");
    }

    /// The held lease at index `from` moved to index `to`.
    fn rename(&mut self, from: usize, to: usize) {
        self.renewals.rename(from, to);
        self.belief_ends.rename(from, to);
    }
}

impl Held {
    /// The local time the belief ends (0 if the grant supported none).
    fn until_local_ms(&self) -> u64 {
        self.belief.held_at(0).map_or(0, |b| b.until_local_ms)
    }
}

/// The keeper's state and decisions; see the module docs.
#[derive(Debug)]
pub struct KeeperCore {
    timing: KeeperTiming,
    belief_config: BeliefConfig,
    /// Deliberately wrong (mutation): measure beliefs from the reply's arrival.
    belief_from_reply: bool,
    /// Looked up on every reply, and never iterated in an order anyone sees
    /// ([`beliefs`](Self::beliefs) sorts): hashed, at foldhash's fixed seed. A sorted map cost
    /// a walk of several tree nodes per lookup, three lookups per renewal, and at 50 nodes
    /// those nodes are rarely in cache.
    held: IndexMap<ActorId, Held, foldhash::fast::FixedState>,
    /// Actors whose last acquire ended with an unknown outcome.
    unknown_acquires: BTreeSet<ActorId>,
    /// Releases the store has not answered yet; their actors cannot be acquired until it
    /// does. [`poll`](Self::poll) retries them, so they resolve even if the caller gave up.
    releasing: BTreeMap<ActorId, PendingRelease>,
    /// Releases begun per actor: an acquire whose reply arrives after a release of its actor
    /// was begun (sent concurrently, by another task) must not start a belief, since the
    /// release may be applied after the grant and free it.
    releases_begun: BTreeMap<ActorId, u64>,
    /// Grants not believed for that reason, to release once the actor's pending release is
    /// answered: the store may have applied that release first and then granted, and the
    /// grant, renewed by no one, would keep the actor from every other node until it expired.
    disowned: BTreeMap<ActorId, FencingToken>,
    /// The held leases and pending releases by when they next need the keeper: renewals due,
    /// beliefs ending, release retries due. A round looks only at what is due, so its cost
    /// does not grow with the number of leases held (it was a scan of all of them, several
    /// times per round, and rounds come as often as leases are due).
    schedule: Schedule,
    /// Incremented on every change of belief, so observers can skip unchanged states.
    belief_epoch: u64,
    /// The actors whose belief changed since [`take_changed_beliefs`](Self::take_changed_beliefs)
    /// last ran, kept only once an observer asked for them ([`track_changes`](Self::track_changes)),
    /// so that it can re-read those beliefs instead of all of them.
    changed: Option<ChangedActors>,
    stopped: bool,
    /// Closed for shutdown ([`close`](Self::close)): no acquire is sent from then on.
    closed: bool,
    /// Acquires sent whose caller has not yet had the reply (or stopped waiting for it).
    acquires_in_flight: usize,
    /// Releases the store answered since [`close`](Self::close).
    released_since_close: usize,
}

/// How far a closed keeper's shutdown has come ([`KeeperCore::closing_progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClosingProgress {
    /// Beliefs still in force: leases not yet released.
    pub beliefs: usize,
    /// Acquires still in flight: each may yet be granted, and its lease then believed.
    pub acquires_in_flight: usize,
    /// Releases sent that the store has not answered yet (the keeper's loop retries them).
    pub releases_pending: usize,
    /// Releases the store answered since the keeper closed.
    pub released: usize,
}

impl ClosingProgress {
    /// Whether nothing is held, being acquired or being released any more.
    pub fn is_done(&self) -> bool {
        self.beliefs == 0 && self.acquires_in_flight == 0 && self.releases_pending == 0
    }
}

/// Below this many noted changes, [`ChangedActors`] never compacts.
const CHANGED_COMPACT_MIN: usize = 64;

/// Actors whose belief changed, in a buffer kept across takes: a set's nodes were allocated
/// afresh after every take, and an observer takes after every step that changed a belief.
/// Duplicates are removed when taken, and whenever the buffer doubles, so it never holds
/// more than about twice the actors that changed.
#[derive(Debug)]
struct ChangedActors {
    actors: Vec<ActorId>,
    compact_at: usize,
}

impl ChangedActors {
    fn new() -> Self {
        Self {
            actors: Vec::new(),
            compact_at: CHANGED_COMPACT_MIN,
        }
    }

    fn note(&mut self, actor_id: &ActorId) {
        // A change of the actor noted last (several steps of one reply) needs no second entry.
        if self.actors.last() != Some(actor_id) {
            self.actors.push(actor_id.clone());
        }
        if self.actors.len() >= self.compact_at {
            self.compact();
            self.compact_at = (2 * self.actors.len()).max(CHANGED_COMPACT_MIN);
        }
    }

    /// Sorted by actor, each once.
    fn compact(&mut self) {
        self.actors.sort_unstable();
        self.actors.dedup();
    }
}

/// The wait before the next attempt at a release that failed `failures` times in a row: the
/// retry interval, doubled per failure after the first, at most
/// [`RELEASE_BACKOFF_INTERVALS_MAX`] retry intervals.
fn release_backoff_ms(retry_interval_ms: u64, failures: u32) -> u64 {
    debug_assert!(failures >= 1, "a backoff follows a failure");
    let doublings = failures.saturating_sub(1).min(u64::BITS - 1);
    let intervals = 1u64
        .checked_shl(doublings)
        .unwrap_or(u64::MAX)
        .min(RELEASE_BACKOFF_INTERVALS_MAX);
    retry_interval_ms.saturating_mul(intervals)
}

impl KeeperCore {
    /// A keeper holding nothing, with validated `timing`.
    pub fn new(timing: KeeperTiming) -> Self {
        Self {
            belief_config: timing.belief_config(),
            timing,
            belief_from_reply: false,
            held: IndexMap::default(),
            unknown_acquires: BTreeSet::new(),
            releasing: BTreeMap::new(),
            releases_begun: BTreeMap::new(),
            disowned: BTreeMap::new(),
            schedule: Schedule::default(),
            belief_epoch: 0,
            changed: None,
            stopped: false,
            closed: false,
            acquires_in_flight: 0,
            released_since_close: 0,
        }
    }

    /// From now on, remembers which actors' beliefs change, for
    /// [`take_changed_beliefs`](Self::take_changed_beliefs).
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(ChangedActors::new);
    }

    /// The actors whose belief started, was extended or was dropped since the last call (in
    /// actor order), each with its belief in force at `now_ms`, if any. Empty unless
    /// [`track_changes`](Self::track_changes) was called.
    pub fn take_changed_beliefs(&mut self, now_ms: u64) -> Vec<(ActorId, Option<HeldBelief>)> {
        let mut taken = Vec::new();
        self.take_changed_beliefs_into(now_ms, &mut taken);
        taken
    }

    /// [`take_changed_beliefs`](Self::take_changed_beliefs), appended to `taken`.
    pub fn take_changed_beliefs_into(
        &mut self,
        now_ms: u64,
        taken: &mut Vec<(ActorId, Option<HeldBelief>)>,
    ) {
        let Some(changed) = self.changed.as_mut() else {
            return;
        };
        changed.compact();
        changed.compact_at = CHANGED_COMPACT_MIN;
        let held = &self.held;
        taken.extend(changed.actors.drain(..).map(|actor_id| {
            let belief = held.get(&actor_id).and_then(|h| h.belief.held_at(now_ms));
            (actor_id, belief)
        }));
    }

    /// Whether any belief changed since the changes were last taken (always `false` unless
    /// [`track_changes`](Self::track_changes) was called).
    pub fn has_changed_beliefs(&self) -> bool {
        self.changed.as_ref().is_some_and(|c| !c.actors.is_empty())
    }

    /// Notes a change of the belief in `actor_id`.
    fn belief_changed(&mut self, actor_id: &ActorId) {
        self.belief_epoch += 1;
        if let Some(changed) = self.changed.as_mut() {
            changed.note(actor_id);
        }
    }

    /// The mutation that measures beliefs from the reply's arrival.
    pub(super) fn with_belief_from_reply(mut self, belief_from_reply: bool) -> Self {
        self.belief_from_reply = belief_from_reply;
        self
    }

    /// Whether an acquire of `actor_id` may be sent now: not while a release of it is
    /// unresolved (a delayed copy of that release could free the re-acquired lease). The
    /// ticket goes back with the reply to [`acquire_replied`](Self::acquire_replied).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] while the release is in flight or not yet answered.
    pub fn begin_acquire(&mut self, actor_id: &ActorId) -> Result<AcquireTicket, LeaseError> {
        if self.closed {
            return Err(LeaseError::Store(StoreError::Unavailable {
                reason: format!("the keeper is shutting down: {actor_id} is not acquired"),
            }));
        }
        if self.releasing.contains_key(actor_id) {
            return Err(LeaseError::Store(StoreError::Unavailable {
                reason: format!("the release of {actor_id} is still in flight; retry later"),
            }));
        }
        self.acquires_in_flight += 1;
        Ok(AcquireTicket {
            releases_begun: self.releases_begun.get(actor_id).copied().unwrap_or(0),
        })
    }

    /// The reply to an acquire sent at `sent_local_ms` with `ticket`, arriving at `now_ms`. A
    /// grant starts (or refreshes) the belief, unless a release of the actor was begun while
    /// the acquire was in flight: that release may reach the store after the grant and free
    /// it, so the grant is not believed (the caller may acquire again once the release is
    /// answered). An unknown outcome is remembered so that the retry that resolves it is seen.
    pub fn acquire_replied(
        &mut self,
        actor_id: &ActorId,
        ticket: AcquireTicket,
        sent_local_ms: u64,
        now_ms: u64,
        result: &Result<Lease, LeaseError>,
    ) -> Option<KeeperEvent> {
        let was_unknown = self.unknown_acquires.remove(actor_id);
        let releases_begun = self.releases_begun.get(actor_id).copied().unwrap_or(0);
        if let (Ok(lease), true) = (result, releases_begun != ticket.releases_begun) {
            kelpie_core::coverage::mark(MARK_GRANT_OVERTAKEN_BY_RELEASE);
            self.disown(actor_id, lease.fencing_token, now_ms);
            return None;
        }
        match result {
            Ok(lease) => {
                if was_unknown {
                    kelpie_core::coverage::mark(MARK_COMMIT_UNKNOWN_RESOLVED);
                }
                let base_ms = self.belief_base_ms(sent_local_ms, now_ms);
                let held_before = self.holds(actor_id, now_ms);
                let until_local_ms = self.believe(actor_id, base_ms, lease.fencing_token)?;
                let (actor_id, fencing_token) = (actor_id.clone(), lease.fencing_token);
                Some(match held_before == Some(fencing_token) {
                    true => KeeperEvent::Renewed {
                        actor_id,
                        fencing_token,
                        until_local_ms,
                    },
                    false => KeeperEvent::Acquired {
                        actor_id,
                        fencing_token,
                        until_local_ms,
                    },
                })
            }
            Err(LeaseError::Store(StoreError::CommitUnknown { .. })) => {
                self.unknown_acquires.insert(actor_id.clone());
                None
            }
            Err(_) => None,
        }
    }

    /// A grant of `token` on `actor_id` that is not believed is released like any other lease
    /// (retried until answered; the actor cannot be acquired again meanwhile), once the
    /// actor's pending release, if any, is answered.
    fn disown(&mut self, actor_id: &ActorId, token: FencingToken, now_ms: u64) {
        if let Some(pending) = self.releasing.get(actor_id) {
            // The release of that very token: the store applied the acquire first (a grant
            // to a holder keeps its token), and the release then frees it.
            if pending.fencing_token == token {
                return;
            }
            let disowned = self.disowned.entry(actor_id.clone()).or_insert(token);
            *disowned = (*disowned).max(token);
            return;
        }
        // A release begun like any other: an acquire already in flight (sent once the raced
        // release was answered) may be answered with this very token, and must not be
        // believed, or this release would end it under its guard.
        *self.releases_begun.entry(actor_id.clone()).or_insert(0) += 1;
        let pending = PendingRelease {
            fencing_token: token,
            attempts: 0,
            next_attempt_local_ms: now_ms,
        };
        self.set_releasing(actor_id, Some(pending));
    }

    /// Whether a release is due now that no round has sent yet: a disowned grant's.
    pub fn release_due_by(&self, now_ms: u64) -> bool {
        self.schedule
            .release_retries
            .first()
            .is_some_and(|(at_ms, _)| *at_ms <= now_ms)
    }

    /// Stops believing in the lease on `actor_id` and returns the token to release, or
    /// `None` if nothing is held. Until the store answers the release, the actor cannot be
    /// acquired again.
    pub fn begin_release(&mut self, actor_id: &ActorId, now_ms: u64) -> Option<FencingToken> {
        self.begin_release_of(actor_id, None, now_ms)
    }

    /// [`begin_release`](Self::begin_release) of the lease on `actor_id` only if the belief
    /// in it carries `token` (any, with `None`): a caller releasing the lease of one tenure
    /// (a guard's) must not release a later one that started meanwhile.
    pub fn begin_release_of(
        &mut self,
        actor_id: &ActorId,
        token: Option<FencingToken>,
        now_ms: u64,
    ) -> Option<FencingToken> {
        if let Some(token) = token {
            let believed = self.held.get(actor_id).map(|held| held.fencing_token);
            if believed != Some(token) {
                return None;
            }
        }
        let held = self.remove_held(actor_id)?;
        *self.releases_begun.entry(actor_id.clone()).or_insert(0) += 1;
        self.belief_changed(actor_id);
        let pending = PendingRelease {
            fencing_token: held.fencing_token,
            attempts: 0,
            next_attempt_local_ms: now_ms + self.timing.retry_interval_ms,
        };
        self.set_releasing(actor_id, Some(pending));
        Some(held.fencing_token)
    }

    /// The reply to a release of `token`: an answer (applied or refused) resolves it and
    /// returns [`KeeperEvent::Released`]; a store failure schedules another attempt, after
    /// twice the last wait, at most [`RELEASE_BACKOFF_INTERVALS_MAX`] retry intervals. There
    /// is always another attempt: the actor cannot be acquired here until one is answered.
    pub fn release_replied(
        &mut self,
        actor_id: &ActorId,
        token: FencingToken,
        now_ms: u64,
        result: &Result<Lease, LeaseError>,
    ) -> Option<KeeperEvent> {
        let pending = *self.releasing.get(actor_id)?;
        if pending.fencing_token != token {
            return None;
        }
        match result {
            Err(LeaseError::Store(_)) => {
                let attempts = pending.attempts.saturating_add(1);
                let retry = PendingRelease {
                    attempts,
                    next_attempt_local_ms: now_ms.saturating_add(release_backoff_ms(
                        self.timing.retry_interval_ms,
                        attempts,
                    )),
                    ..pending
                };
                self.set_releasing(actor_id, Some(retry));
                None
            }
            _ => {
                self.set_releasing(actor_id, None);
                if let Some(token) = self.disowned.remove(actor_id) {
                    self.disown(actor_id, token, now_ms);
                }
                self.released_since_close += usize::from(self.closed);
                Some(KeeperEvent::Released {
                    actor_id: actor_id.clone(),
                    fencing_token: token,
                })
            }
        }
    }

    /// Drops the beliefs that ran out by `now_ms`, returning an event for each.
    pub fn expire(&mut self, now_ms: u64) -> Vec<KeeperEvent> {
        // A belief has run out at `now_ms` when it ends at or before it.
        let held = &self.held;
        let mut ran_out: Vec<ActorId> = Vec::new();
        self.schedule.belief_ends.for_each_due(now_ms, |index| {
            let (actor_id, _) = held.get_index(index).expect("scheduled means held");
            ran_out.push(actor_id.clone());
        });
        ran_out.sort_unstable();
        let mut events = Vec::with_capacity(ran_out.len());
        for actor_id in ran_out {
            let held = self.remove_held(&actor_id).expect("scheduled means held");
            assert!(
                held.belief.held_at(now_ms).is_none(),
                "only ended beliefs expire"
            );
            self.belief_changed(&actor_id);
            kelpie_core::coverage::mark(MARK_BELIEF_ENDED);
            events.push(KeeperEvent::Lost {
                actor_id,
                fencing_token: held.fencing_token,
                reason: LostReason::BeliefExpired,
            });
        }
        events
    }

    /// One round at `now_ms`: drops the beliefs that ran out (their events first), then the
    /// renewals and release retries due now. `None` once stopped.
    pub fn poll(&mut self, now_ms: u64) -> Option<(Vec<KeeperEvent>, Vec<KeeperRequest>)> {
        if self.stopped {
            return None;
        }
        let events = self.expire(now_ms);
        // Built in one vector (not a list of due actors first, then the requests): a round
        // that renews costs one allocation here.
        let mut requests: Vec<KeeperRequest> = Vec::new();
        self.schedule.renewals.for_each_due(now_ms, |index| {
            let (actor_id, held) = self.held.get_index(index).expect("scheduled means held");
            requests.push(KeeperRequest::Renew {
                actor_id: actor_id.clone(),
                fencing_token: held.fencing_token,
                sent_local_ms: now_ms,
            });
        });
        let renewals = requests.len();
        let retries = &self.schedule.release_retries;
        requests.extend(
            retries
                .iter()
                .take_while(|(at_ms, _)| *at_ms <= now_ms)
                .map(|(_, actor_id)| KeeperRequest::Release {
                    actor_id: actor_id.clone(),
                    fencing_token: self.releasing[actor_id].fencing_token,
                }),
        );
        // Renewals, then release retries, each in actor order.
        let (renewing, releasing) = requests.split_at_mut(renewals);
        renewing.sort_unstable_by(|a, b| a.actor_id().cmp(b.actor_id()));
        releasing.sort_unstable_by(|a, b| a.actor_id().cmp(b.actor_id()));
        Some((events, requests))
    }

    /// The reply to a renewal of `token` sent at `sent_local_ms`, arriving at `now_ms`. A
    /// renewal extends the belief ([`KeeperEvent::Renewed`]); a store failure schedules a
    /// retry ([`KeeperEvent::RenewalFailed`]); a refusal ends the belief
    /// ([`KeeperEvent::Lost`]). Ignored if the belief changed meanwhile (released, run out,
    /// or replaced by another tenure).
    pub fn renew_replied(
        &mut self,
        actor_id: &ActorId,
        token: FencingToken,
        sent_local_ms: u64,
        now_ms: u64,
        result: Result<Lease, LeaseError>,
    ) -> Option<KeeperEvent> {
        // Looked up once: the belief and the schedule are updated at this index.
        let (index, _, &held) = self.held.get_full(actor_id)?;
        if held.fencing_token != token {
            return None;
        }
        match result {
            Ok(lease) if lease.fencing_token != token => {
                // A renewal never changes the token; a store that says otherwise is broken
                // (see the etcd backend's mod-revision mutation), and the node stops trusting
                // it with this lease rather than crash.
                self.remove_held(actor_id);
                self.belief_changed(actor_id);
                Some(KeeperEvent::Lost {
                    actor_id: actor_id.clone(),
                    fencing_token: token,
                    reason: LostReason::TokenChanged {
                        answered: lease.fencing_token,
                    },
                })
            }
            Ok(_) => {
                let base_ms = self.belief_base_ms(sent_local_ms, now_ms);
                let until_local_ms = self.believe_at(Some(index), actor_id, base_ms, token)?;
                Some(KeeperEvent::Renewed {
                    actor_id: actor_id.clone(),
                    fencing_token: token,
                    until_local_ms,
                })
            }
            Err(LeaseError::Store(error)) => {
                kelpie_core::coverage::mark(MARK_RENEWAL_FAILED);
                let retry = Held {
                    next_renew_local_ms: now_ms + self.timing.retry_interval_ms,
                    ..held
                };
                self.set_held_at(Some(index), actor_id, retry);
                Some(KeeperEvent::RenewalFailed {
                    actor_id: actor_id.clone(),
                    fencing_token: token,
                    error,
                })
            }
            Err(refusal) => {
                kelpie_core::coverage::mark(MARK_RENEWAL_REFUSED);
                self.remove_held(actor_id);
                self.belief_changed(actor_id);
                Some(KeeperEvent::Lost {
                    actor_id: actor_id.clone(),
                    fencing_token: token,
                    reason: LostReason::Refused(refusal),
                })
            }
        }
    }

    /// The token of the lease on `actor_id` the node may act on at `now_ms`, if any.
    pub fn holds(&self, actor_id: &ActorId, now_ms: u64) -> Option<FencingToken> {
        let held = self.held.get(actor_id)?;
        held.belief.held_at(now_ms).map(|h| h.fencing_token)
    }

    /// Whether a renewal is due at or before `now_ms`.
    pub fn renewal_due_by(&self, now_ms: u64) -> bool {
        self.schedule
            .renewals
            .first_ms()
            .is_some_and(|due_ms| due_ms <= now_ms)
    }

    /// The belief in the lease on `actor_id` in force at `now_ms`, if any.
    pub fn belief(&self, actor_id: &ActorId, now_ms: u64) -> Option<HeldBelief> {
        self.held.get(actor_id)?.belief.held_at(now_ms)
    }

    /// Every belief in force at `now_ms`, in actor order.
    pub fn beliefs(&self, now_ms: u64) -> Vec<(ActorId, HeldBelief)> {
        let held = self.held.iter();
        let mut beliefs: Vec<(ActorId, HeldBelief)> = held
            .filter_map(|(a, h)| h.belief.held_at(now_ms).map(|b| (a.clone(), b)))
            .collect();
        beliefs.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        beliefs
    }

    /// A number that changes whenever a belief starts, is extended or is dropped.
    pub fn belief_epoch(&self) -> u64 {
        self.belief_epoch
    }

    /// The local time the earliest belief ends, if any is held.
    pub fn earliest_belief_end_ms(&self) -> Option<u64> {
        self.schedule.belief_ends.first_ms()
    }

    /// The local time of the next round: the earliest renewal, belief end or release retry,
    /// and at most a renew interval after `now_ms`.
    pub fn next_wake_ms(&self, now_ms: u64) -> u64 {
        let far_ms = now_ms + self.timing.renew_interval_ms;
        let schedule = &self.schedule;
        let firsts = [
            schedule.renewals.first_ms(),
            schedule.belief_ends.first_ms(),
            schedule.release_retries.first().map(|(at_ms, _)| *at_ms),
        ];
        firsts.into_iter().flatten().fold(far_ms, u64::min)
    }

    /// Makes [`poll`](Self::poll) return `None` from now on.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// The caller of an acquire begun with [`begin_acquire`](Self::begin_acquire) has its
    /// reply, or stopped waiting for it.
    pub fn acquire_ended(&mut self) {
        assert!(
            self.acquires_in_flight > 0,
            "an acquire ends once, after it began"
        );
        self.acquires_in_flight -= 1;
    }

    /// Closes the keeper for shutdown: every acquire is refused from now on, and the releases
    /// the store answers are counted ([`closing_progress`](Self::closing_progress)). Renewals
    /// and release retries go on until [`stop`](Self::stop).
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// How far the shutdown has come, at `now_ms`.
    pub fn closing_progress(&self, now_ms: u64) -> ClosingProgress {
        ClosingProgress {
            beliefs: self.beliefs(now_ms).len(),
            acquires_in_flight: self.acquires_in_flight,
            releases_pending: self.releasing.len(),
            released: self.released_since_close,
        }
    }

    /// Starts or extends the belief in `token` from `base_ms`; returns its end, or `None` if
    /// the grant arrived too late to support any belief.
    fn believe(&mut self, actor_id: &ActorId, base_ms: u64, token: FencingToken) -> Option<u64> {
        let index = self.held.get_index_of(actor_id);
        self.believe_at(index, actor_id, base_ms, token)
    }

    /// [`Self::believe`] where `index` is `actor_id`'s index in the held map (`None`: it is
    /// not held).
    fn believe_at(
        &mut self,
        index: Option<usize>,
        actor_id: &ActorId,
        base_ms: u64,
        token: FencingToken,
    ) -> Option<u64> {
        let next_renew_local_ms = base_ms + self.timing.renew_interval_ms;
        let mut held = index.map(|index| self.held[index]).unwrap_or(Held {
            belief: Belief::new(),
            fencing_token: token,
            next_renew_local_ms,
        });
        if held.fencing_token != token {
            held.belief.on_lost();
        }
        held.belief.on_granted(&self.belief_config, base_ms, token);
        held.fencing_token = token;
        held.next_renew_local_ms = next_renew_local_ms;
        let until_local_ms = held.belief.held_at(0).map(|b| b.until_local_ms);
        self.set_held_at(index, actor_id, held);
        self.belief_changed(actor_id);
        until_local_ms
    }

    /// Holds `held` for `actor_id`, rescheduling it. `index` is `actor_id`'s index in the held
    /// map (`None`: it is not held), which the caller looked up already.
    fn set_held_at(&mut self, index: Option<usize>, actor_id: &ActorId, held: Held) {
        let index = match index {
            Some(index) => {
                let (at_index, slot) = self.held.get_index_mut(index).expect("a held index");
                debug_assert_eq!(at_index, actor_id, "the index is the actor's");
                *slot = held;
                index
            }
            None => self.held.insert_full(actor_id.clone(), held).0,
        };
        self.schedule.hold(index, &held);
    }

    /// Stops holding `actor_id`, unscheduling it.
    fn remove_held(&mut self, actor_id: &ActorId) -> Option<Held> {
        let (index, _, held) = self.held.swap_remove_full(actor_id)?;
        self.schedule.unhold(index);
        // The last lease moved into the freed index: its entries follow it.
        let moved_from = self.held.len();
        if index < moved_from {
            self.schedule.rename(moved_from, index);
        }
        Some(held)
    }

    /// Sets (or with `None` resolves) the pending release of `actor_id`, rescheduling it.
    fn set_releasing(&mut self, actor_id: &ActorId, pending: Option<PendingRelease>) {
        let before = match pending {
            Some(pending) => self.releasing.insert(actor_id.clone(), pending),
            None => self.releasing.remove(actor_id),
        };
        let retries = &mut self.schedule.release_retries;
        if let Some(before) = before {
            let removed = retries.remove(&(before.next_attempt_local_ms, actor_id.clone()));
            assert!(removed, "a pending release is scheduled once");
        }
        if let Some(pending) = pending {
            retries.insert((pending.next_attempt_local_ms, actor_id.clone()));
        }
    }

    /// The local time a belief is measured from: the send time (the mutation uses now).
    fn belief_base_ms(&self, sent_local_ms: u64, now_ms: u64) -> u64 {
        match self.belief_from_reply {
            true => now_ms,
            false => sent_local_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keeper::KeeperConfig;
    use kelpie_core::NodeId;

    const DURATION_MS: u64 = 900;

    fn core() -> KeeperCore {
        KeeperCore::new(KeeperConfig::default().timing_for(DURATION_MS).unwrap())
    }

    fn actor() -> ActorId {
        ActorId::new("a").unwrap()
    }

    fn granted(token: u64, at_ms: u64) -> Result<Lease, LeaseError> {
        Ok(Lease {
            actor_id: actor(),
            holder: NodeId::new("n1@1").unwrap(),
            fencing_token: FencingToken(token),
            acquired_at_ms: at_ms,
            expires_at_ms: at_ms + DURATION_MS,
            renewal_count: 0,
        })
    }

    /// An acquire sent at `sent_ms` whose reply `result` arrives at `now_ms`.
    fn acquired(
        keeper: &mut KeeperCore,
        sent_ms: u64,
        now_ms: u64,
        result: &Result<Lease, LeaseError>,
    ) -> Option<KeeperEvent> {
        let ticket = keeper.begin_acquire(&actor()).unwrap();
        keeper.acquire_replied(&actor(), ticket, sent_ms, now_ms, result)
    }

    /// The actor held with token 1 since 5 ms, then an acquire of it sent and, before its reply,
    /// the release of token 1 begun at 10 ms: the acquire's ticket.
    fn acquire_racing_a_release(keeper: &mut KeeperCore) -> AcquireTicket {
        acquired(keeper, 0, 5, &granted(1, 2));
        let ticket = keeper.begin_acquire(&actor()).unwrap();
        assert_eq!(keeper.begin_release(&actor(), 10), Some(FencingToken(1)));
        ticket
    }

    /// An acquire in flight while a release of the same actor is begun (another task of the
    /// node): its grant may be freed by that release, so it is not believed.
    #[test]
    fn a_grant_overtaken_by_a_concurrent_release_is_not_believed() {
        let mut keeper = core();
        let ticket = acquire_racing_a_release(&mut keeper);
        let reply = keeper.acquire_replied(&actor(), ticket, 10, 12, &granted(1, 11));
        assert_eq!(reply, None);
        assert_eq!(keeper.holds(&actor(), 12), None);
        // Once the release is answered, a new acquire is believed again.
        keeper.release_replied(&actor(), FencingToken(1), 15, &granted(1, 2));
        assert!(acquired(&mut keeper, 20, 22, &granted(2, 21)).is_some());
        assert_eq!(keeper.holds(&actor(), 22), Some(FencingToken(2)));
    }

    /// A grant overtaken by a release that the store applied first carries a new token and
    /// is held at the store, renewed by no one: the keeper releases it once the release it
    /// raced is answered, and no acquire of the actor goes out until that is answered too.
    /// It was left held, keeping the actor from every node until it expired.
    #[test]
    fn a_grant_overtaken_by_a_release_applied_first_is_released_in_turn() {
        let mut keeper = core();
        let ticket = acquire_racing_a_release(&mut keeper);
        // The store applied the release, then granted the acquire a new token.
        let reply = keeper.acquire_replied(&actor(), ticket, 10, 12, &granted(2, 11));
        assert_eq!(reply, None);
        assert_eq!(keeper.holds(&actor(), 12), None);
        keeper.release_replied(&actor(), FencingToken(1), 15, &granted(1, 2));
        assert!(
            keeper.release_due_by(15),
            "the disowned grant's release is due"
        );
        assert!(
            keeper.begin_acquire(&actor()).is_err(),
            "blocked until it is answered"
        );
        let (_, requests) = keeper.poll(15).unwrap();
        let release = KeeperRequest::Release {
            actor_id: actor(),
            fencing_token: FencingToken(2),
        };
        assert!(requests.contains(&release), "{requests:?}");
        keeper.release_replied(&actor(), FencingToken(2), 17, &granted(2, 11));
        assert!(acquired(&mut keeper, 20, 22, &granted(3, 21)).is_some());
        assert_eq!(keeper.holds(&actor(), 22), Some(FencingToken(3)));
    }

    /// An acquire sent once the raced release was answered, and answered with the grant the
    /// keeper then disowns, is not believed either: that grant's release would end it under
    /// its guard.
    #[test]
    fn an_acquire_answered_with_a_disowned_grant_is_not_believed() {
        let mut keeper = core();
        let overtaken = acquire_racing_a_release(&mut keeper);
        keeper.release_replied(&actor(), FencingToken(1), 12, &granted(1, 2));
        let later = keeper.begin_acquire(&actor()).unwrap();
        assert_eq!(
            keeper.acquire_replied(&actor(), overtaken, 10, 14, &granted(2, 11)),
            None
        );
        assert_eq!(
            keeper.acquire_replied(&actor(), later, 13, 15, &granted(2, 11)),
            None
        );
        assert_eq!(keeper.holds(&actor(), 15), None);
    }

    fn many_actors(count: usize) -> Vec<ActorId> {
        (0..count)
            .map(|i| ActorId::new(format!("actor-{i}")).unwrap())
            .collect()
    }

    /// The schedule names every held lease by its index in the held map, once per index:
    /// the entries a scan of the map gives.
    fn assert_schedule_matches(keeper: &KeeperCore) {
        let scan = |at: fn(&Held) -> u64| -> Vec<(u64, usize)> {
            let mut entries: Vec<(u64, usize)> = (keeper.held.values().enumerate())
                .map(|(i, h)| (at(h), i))
                .collect();
            entries.sort_unstable();
            entries
        };
        let schedule = &keeper.schedule;
        assert_eq!(schedule.renewals.sorted(), scan(|h| h.next_renew_local_ms));
        assert_eq!(schedule.belief_ends.sorted(), scan(Held::until_local_ms));
    }

    /// Releases in every position of the held map (each moves the last lease into the freed
    /// index), renewals, failed renewals and beliefs running out keep the schedule equal to a
    /// scan of the held leases, and rounds renew exactly what the scan says is due.
    #[test]
    fn the_schedule_follows_leases_moved_by_releases() {
        use rand::{Rng, SeedableRng};
        let mut keeper = core();
        let renew_ms = keeper.timing.renew_interval_ms;
        let actors = many_actors(40);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut next = |below: u64| rng.gen_range(0..below);
        let mut now_ms = 0;
        let mut moved = 0;
        for _ in 0..2_000 {
            now_ms += next(20);
            let actor_id = &actors[next(actors.len() as u64) as usize];
            let index = keeper.held.get_index_of(actor_id);
            match (index, next(4)) {
                (None, _) => {
                    if let Ok(ticket) = keeper.begin_acquire(actor_id) {
                        let lease = Lease {
                            actor_id: actor_id.clone(),
                            ..granted(now_ms, now_ms).unwrap()
                        };
                        keeper.acquire_replied(actor_id, ticket, now_ms, now_ms, &Ok(lease));
                    } else if let Some(&pending) = keeper.releasing.get(actor_id) {
                        let freed = granted(pending.fencing_token.0, now_ms);
                        keeper.release_replied(actor_id, pending.fencing_token, now_ms, &freed);
                    }
                }
                (Some(index), 0) => {
                    moved += usize::from(index + 1 < keeper.held.len());
                    assert!(keeper.begin_release(actor_id, now_ms).is_some());
                }
                (Some(index), 1) => {
                    let token = keeper.held[index].fencing_token;
                    let lease = Lease {
                        actor_id: actor_id.clone(),
                        ..granted(token.0, now_ms).unwrap()
                    };
                    keeper.renew_replied(actor_id, token, now_ms, now_ms, Ok(lease));
                }
                (Some(index), 2) => {
                    let token = keeper.held[index].fencing_token;
                    keeper.renew_replied(actor_id, token, now_ms, now_ms, unavailable());
                }
                (Some(_), _) => {
                    let mut due: Vec<ActorId> = keeper
                        .held
                        .iter()
                        .filter(|(_, h)| h.belief.held_at(now_ms).is_some())
                        .filter(|(_, h)| h.next_renew_local_ms <= now_ms)
                        .map(|(a, _)| a.clone())
                        .collect();
                    due.sort();
                    let (_, requests) = keeper.poll(now_ms).unwrap();
                    let renewed: Vec<ActorId> = requests
                        .iter()
                        .filter(|r| matches!(r, KeeperRequest::Renew { .. }))
                        .map(|r| r.actor_id().clone())
                        .collect();
                    assert_eq!(renewed, due, "at {now_ms} ms");
                }
            }
            assert_schedule_matches(&keeper);
        }
        assert!(moved >= 50, "releases that moved a lease: {moved}");
        assert!(
            keeper.held.len() >= 5,
            "{} held at the end",
            keeper.held.len()
        );
        assert!(now_ms > 10 * renew_ms, "beliefs had time to run out");
    }

    /// With many leases acquired at different times, each round renews exactly the leases
    /// due (in actor order, as the requests always went out), drops exactly the beliefs that
    /// ran out, and wakes at the earliest next renewal: the schedule a round reads agrees with
    /// a scan of every lease, which is what it replaced (issue 16: rounds cost a scan of all
    /// held leases, several times, and come as often as leases are due).
    #[test]
    fn rounds_renew_exactly_the_leases_due_among_many() {
        let mut keeper = core();
        let renew_ms = keeper.timing.renew_interval_ms;
        let actors = many_actors(300);
        // Acquired in reverse actor order, one per ms: due times and actor order disagree.
        for (at_ms, actor_id) in actors.iter().rev().enumerate() {
            let at_ms = at_ms as u64;
            let ticket = keeper.begin_acquire(actor_id).unwrap();
            let lease = Lease {
                actor_id: actor_id.clone(),
                ..granted(1, at_ms).unwrap()
            };
            keeper.acquire_replied(actor_id, ticket, at_ms, at_ms, &Ok(lease));
        }
        for now_ms in [renew_ms - 1, renew_ms + 10, renew_ms + 150] {
            let mut due: Vec<ActorId> = keeper
                .held
                .iter()
                .filter(|(_, h)| h.next_renew_local_ms <= now_ms)
                .map(|(a, _)| a.clone())
                .collect();
            due.sort();
            let (events, requests) = keeper.poll(now_ms).unwrap();
            assert!(events.is_empty());
            let renewed: Vec<ActorId> = requests
                .iter()
                .map(|r| match r {
                    KeeperRequest::Renew { actor_id, .. } => actor_id.clone(),
                    other => panic!("only renewals are due: {other:?}"),
                })
                .collect();
            assert_eq!(renewed, due, "at {now_ms} ms");
            let earliest = keeper.held.values().map(|h| h.next_renew_local_ms).min();
            assert_eq!(
                keeper.next_wake_ms(now_ms),
                earliest.unwrap().min(now_ms + renew_ms)
            );
        }
        // Without renewals answered, every belief runs out, each exactly once.
        let end_ms = keeper.earliest_belief_end_ms().unwrap();
        let late_ms = end_ms + actors.len() as u64;
        let (lost, _) = keeper.poll(late_ms).unwrap();
        assert_eq!(lost.len(), actors.len());
        assert!(keeper.held.is_empty() && keeper.schedule.belief_ends.first_ms().is_none());
        assert!(keeper.schedule.renewals.first_ms().is_none());
    }

    fn unavailable() -> Result<Lease, LeaseError> {
        Err(LeaseError::Store(StoreError::Unavailable {
            reason: "partitioned".into(),
        }))
    }

    /// The belief is measured from the send time, however late the reply: a grant whose
    /// reply took the whole belief to arrive grants nothing.
    #[test]
    fn beliefs_are_measured_from_the_send_time() {
        let mut keeper = core();
        let belief_ms = keeper.timing.belief_config().belief_duration_ms();
        acquired(&mut keeper, 100, 150, &granted(1, 120));
        assert_eq!(
            keeper.holds(&actor(), 100 + belief_ms - 1),
            Some(FencingToken(1))
        );
        assert_eq!(keeper.holds(&actor(), 100 + belief_ms), None);
        let mut late = core();
        acquired(&mut late, 100, 100 + belief_ms, &granted(1, 120));
        assert_eq!(late.holds(&actor(), 100 + belief_ms), None);
    }

    /// Renewals come due a renew interval after the send, failed ones are retried a retry
    /// interval later, and a belief that ran out is reported once.
    #[test]
    fn poll_renews_retries_and_reports_the_end_once() {
        let mut keeper = core();
        let timing = keeper.timing;
        acquired(&mut keeper, 0, 5, &granted(1, 2));
        let (events, requests) = keeper.poll(timing.renew_interval_ms - 1).unwrap();
        assert!(events.is_empty() && requests.is_empty());
        let at_ms = timing.renew_interval_ms;
        let (_, requests) = keeper.poll(at_ms).unwrap();
        let expected = KeeperRequest::Renew {
            actor_id: actor(),
            fencing_token: FencingToken(1),
            sent_local_ms: at_ms,
        };
        assert_eq!(requests, vec![expected]);
        let failed =
            keeper.renew_replied(&actor(), FencingToken(1), at_ms, at_ms + 3, unavailable());
        assert!(
            matches!(failed, Some(KeeperEvent::RenewalFailed { .. })),
            "{failed:?}"
        );
        assert_eq!(
            keeper.next_wake_ms(at_ms + 3),
            at_ms + 3 + timing.retry_interval_ms
        );
        let end_ms = keeper.earliest_belief_end_ms().unwrap();
        let (events, _) = keeper.poll(end_ms).unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        let (events, requests) = keeper.poll(end_ms + 1).unwrap();
        assert!(events.is_empty() && requests.is_empty());
    }

    /// A refused renewal ends the belief at once; a reply for a token no longer believed is
    /// ignored.
    #[test]
    fn a_refused_renewal_ends_the_belief_and_stale_replies_are_ignored() {
        let mut keeper = core();
        acquired(&mut keeper, 0, 5, &granted(2, 2));
        let stale = keeper.renew_replied(&actor(), FencingToken(1), 0, 10, granted(1, 9));
        assert!(stale.is_none());
        assert_eq!(keeper.holds(&actor(), 10), Some(FencingToken(2)));
        let refusal = Err(LeaseError::Expired {
            actor_id: actor(),
            node_id: NodeId::new("n1@1").unwrap(),
            expired_at_ms: 5,
        });
        let lost = keeper.renew_replied(&actor(), FencingToken(2), 300, 310, refusal);
        assert!(matches!(lost, Some(KeeperEvent::Lost { .. })));
        assert_eq!(keeper.holds(&actor(), 310), None);
    }

    /// A release drops the belief first and blocks re-acquiring until the store answers;
    /// its retries come from `poll`.
    #[test]
    fn an_unresolved_release_blocks_re_acquiring() {
        let mut keeper = core();
        let retry_ms = keeper.timing.retry_interval_ms;
        acquired(&mut keeper, 0, 5, &granted(1, 2));
        assert_eq!(keeper.begin_release(&actor(), 10), Some(FencingToken(1)));
        assert_eq!(keeper.holds(&actor(), 10), None);
        assert!(keeper.begin_acquire(&actor()).is_err());
        keeper.release_replied(&actor(), FencingToken(1), 20, &unavailable());
        let (_, requests) = keeper.poll(20 + retry_ms).unwrap();
        assert_eq!(
            requests,
            vec![KeeperRequest::Release {
                actor_id: actor(),
                fencing_token: FencingToken(1)
            }]
        );
        keeper.release_replied(&actor(), FencingToken(1), 30, &granted(1, 2));
        assert!(keeper.begin_acquire(&actor()).is_ok());
    }

    /// A release the store fails again and again is retried at a growing interval, up to
    /// `RELEASE_BACKOFF_INTERVALS_MAX` retry intervals, for as long as it takes: the first
    /// answer frees the actor. The keeper used to give up after 1,000 failures (83 lease
    /// durations at the default retry interval) and block the actor for the rest of the
    /// process, so an outage of that length left actors that no node here could acquire.
    #[test]
    fn a_release_is_retried_until_answered_however_long_the_store_fails() {
        let mut keeper = core();
        let retry_ms = keeper.timing.retry_interval_ms;
        acquired(&mut keeper, 0, 5, &granted(1, 2));
        keeper.begin_release(&actor(), 10);
        let mut now_ms = 10;
        let mut waits_ms = Vec::new();
        for failure in 0..5_000 {
            assert!(keeper.begin_acquire(&actor()).is_err(), "failure {failure}");
            keeper.release_replied(&actor(), FencingToken(1), now_ms, &unavailable());
            let (due_ms, _) = *keeper
                .schedule
                .release_retries
                .first()
                .expect("a retry is due");
            assert!(keeper.poll(due_ms - 1).unwrap().1.is_empty());
            let (_, requests) = keeper.poll(due_ms).unwrap();
            assert_eq!(requests.len(), 1, "failure {failure}: the retry is sent");
            waits_ms.push(due_ms - now_ms);
            now_ms = due_ms;
        }
        let cap_ms = retry_ms * RELEASE_BACKOFF_INTERVALS_MAX;
        assert_eq!(
            &waits_ms[..4],
            &[retry_ms, 2 * retry_ms, 4 * retry_ms, 8 * retry_ms]
        );
        assert!(waits_ms.iter().all(|&wait_ms| wait_ms <= cap_ms));
        assert_eq!(waits_ms.last(), Some(&cap_ms));
        keeper.release_replied(&actor(), FencingToken(1), now_ms, &granted(1, 2));
        assert!(keeper.begin_acquire(&actor()).is_ok());
    }

    #[test]
    fn a_stopped_keeper_polls_nothing() {
        let mut keeper = core();
        keeper.stop();
        assert_eq!(keeper.poll(0), None);
    }
}
