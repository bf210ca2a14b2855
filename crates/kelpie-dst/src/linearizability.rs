//! A Wing–Gong style linearizability checker for lease histories.
//!
//! The sequential model is the lease store itself: one record per actor and the store's clock,
//! with [`decide`] as the transition. A history is linearizable if its operations can be put
//! in one order, each taking effect at one store instant within its interval (from
//! invocation to response), instants never going back along the order, such that every
//! answered operation got exactly the reply `decide` gives at that instant on the record left
//! by the operations before it. Operations whose outcome the node never learned (timeouts,
//! store failures, crashes) may take effect at any instant after their invocation, or never.
//! The network may deliver a request twice (the protocol is built for it: acquire is
//! idempotent, renew and release carry the token), so every operation may also take effect a
//! second time, unseen, at any instant after its invocation.
//!
//! Leases on different actors are independent, so the history is split per actor and each
//! part is checked alone (P-compositionality). The search is depth-first over the
//! operations that may go next (Wing and Gong), with Lowe's memoisation of visited states.
//! An answered operation takes effect at the earliest instant at which its reply matches:
//! the state it leaves does not depend on the instant (grants name the instant in their
//! expiry), so the earliest one leaves the most room for what follows.
//!
//! Effects nobody saw are the hard part: they depend on an instant nobody observed, and a
//! chain of them (an unseen grant, then an unseen renewal) can stand between two answers.
//! The model therefore keeps a record's token, acquisition and expiry as lower bounds
//! ("open") after an unseen effect, until a later reply reveals them: one open grant stands
//! for any chain of unseen tenures. This relaxation accepts every history the exact model
//! accepts, and a few more. The search tries an unseen effect only where an answered
//! operation that may go next does not fit, and only if the effect brings the record closer
//! to what that operation saw (its tenure, its holder, its renewal count, its expiry), so
//! chains stay as short as the replies demand. If that finds no linearization, the search is
//! repeated trying such effects at every step before a violation is reported. Goal-directed
//! search is a heuristic, so a reported violation is checked this second way; sweeps of
//! thousands of seeds over the correct store report none. The search gives up with an
//! explicit error after [`LINEARIZABILITY_SEARCH_STATES_MAX`] states.

use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::{decide, Lease, LeaseError, LeaseOp, LeaseRecord, LeaseRequest};

use crate::history::{HistoryOp, OpOutcome};

/// Most search states explored for one actor before the check gives up with
/// [`LinearizabilityError::SearchBound`].
pub const LINEARIZABILITY_SEARCH_STATES_MAX: u64 = 2_000_000;

/// Most grants tried as the start of a smaller offending window once a violation is found.
pub const OFFENDING_WINDOW_STARTS_TRIED_MAX: usize = 64;

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
/// first actor (in actor id order) whose history is not linearizable.
///
/// The model's own calls to [`decide`] would count as coverage marks of the store; the marks
/// are put back as they were, so a sweep's coverage still says what the store did.
pub fn check_history(ops: &[HistoryOp]) -> Result<LinearizabilityReport, LinearizabilityError> {
    let marks_before = kelpie_core::coverage::take_hits();
    let result = check_actors(ops);
    drop(kelpie_core::coverage::take_hits());
    for (mark, count) in marks_before {
        for _ in 0..count {
            kelpie_core::coverage::mark(mark);
        }
    }
    result
}

fn check_actors(ops: &[HistoryOp]) -> Result<LinearizabilityReport, LinearizabilityError> {
    let mut by_actor: BTreeMap<&ActorId, Vec<(usize, &HistoryOp)>> = BTreeMap::new();
    for (index, op) in ops.iter().enumerate() {
        by_actor.entry(&op.actor_id).or_default().push((index, op));
    }
    let mut report = LinearizabilityReport::default();
    for (actor_id, ops) in by_actor {
        let history = ActorHistory::new(actor_id, &ops, u64::MAX, Start::empty());
        report.actors_checked += 1;
        report.operations_checked += ops.len();
        report.unknown_operations += history.unanswered;
        let outcome = check_actor(&history)?;
        report.states_explored += outcome.states_explored;
        if !outcome.linearizable {
            return Err(LinearizabilityError::NotLinearizable {
                actor_id: actor_id.clone(),
                window: offending_window(actor_id, &ops)?,
            });
        }
    }
    Ok(report)
}

/// The result of searching one actor's history.
struct Outcome {
    linearizable: bool,
    states_explored: u64,
    /// The first operation not linearized on the deepest path, as a definite-op index.
    stuck_at: Option<usize>,
}

/// Searches with effects of unanswered operations only where nothing else fits, then, if that
/// fails, everywhere.
fn check_actor(history: &ActorHistory<'_>) -> Result<Outcome, LinearizabilityError> {
    let mut explored = 0;
    let mut stuck_at = None;
    for effects_everywhere in [false, true] {
        let mut search = Search::new(history, effects_everywhere, explored);
        let found = search.run();
        explored = search.explored;
        stuck_at = stuck_at.or(search.stuck_at);
        match found {
            Some(true) => {
                return Ok(Outcome {
                    linearizable: true,
                    states_explored: explored,
                    stuck_at: None,
                })
            }
            Some(false) => {}
            None => {
                return Err(LinearizabilityError::SearchBound {
                    actor_id: history.actor_id.clone(),
                    operations: history.definite.len() + history.unanswered,
                    states_explored: explored,
                })
            }
        }
    }
    Ok(Outcome {
        linearizable: false,
        states_explored: explored,
        stuck_at,
    })
}

/// An operation the node got an answer to.
struct Definite<'a> {
    index: usize,
    request: &'a LeaseRequest,
    invoked_ms: u64,
    responded_ms: u64,
    reply: &'a Result<Lease, LeaseError>,
}

/// An effect nobody saw: an unanswered operation, or the second delivery of any request.
struct Unseen<'a> {
    request: &'a LeaseRequest,
    invoked_ms: u64,
}

/// Where a history (or a window of it) starts.
#[derive(Clone)]
struct Start {
    record: Option<LeaseRecord>,
    t_last_ms: u64,
    description: String,
}

impl Start {
    fn empty() -> Self {
        Self {
            record: None,
            t_last_ms: 0,
            description: "from the beginning of the history (no record)".into(),
        }
    }
}

/// One actor's operations, prepared for the search.
struct ActorHistory<'a> {
    actor_id: &'a ActorId,
    /// Answered operations, by invocation time.
    definite: Vec<Definite<'a>>,
    /// Effects nobody saw: unanswered operations, and the second delivery every request may
    /// have had.
    unseen: Vec<Unseen<'a>>,
    /// The unseen effects grouped by identical request (node, op, token guard, duration), each
    /// group by invocation time. Members of a group are interchangeable, so the search uses
    /// them earliest first; with the request of each group. Built on first use.
    kinds: std::cell::OnceCell<(Vec<Vec<u64>>, Vec<&'a LeaseRequest>)>,
    /// How many operations were unanswered.
    unanswered: usize,
    start: Start,
}

impl<'a> ActorHistory<'a> {
    /// The operations invoked up to `cut_ms`; those not answered by then count as unanswered.
    fn new(
        actor_id: &'a ActorId,
        ops: &[(usize, &'a HistoryOp)],
        cut_ms: u64,
        start: Start,
    ) -> Self {
        let mut definite = Vec::new();
        let mut unseen = Vec::new();
        let mut unanswered = 0;
        for &(index, op) in ops.iter().filter(|(_, op)| op.invoked_ms <= cut_ms) {
            let (request, invoked_ms) = (&op.request, op.invoked_ms);
            match &op.outcome {
                OpOutcome::Returned {
                    responded_ms,
                    reply,
                } if *responded_ms <= cut_ms && !matches!(reply, Err(LeaseError::Store(_))) => {
                    definite.push(Definite {
                        index,
                        request,
                        invoked_ms,
                        responded_ms: *responded_ms,
                        reply,
                    });
                }
                _ => {
                    unanswered += 1;
                    unseen.push(Unseen {
                        request,
                        invoked_ms,
                    });
                }
            }
            // The network may deliver a request twice, so every request may take effect once
            // more, unseen, at any time after it was sent.
            unseen.push(Unseen {
                request,
                invoked_ms,
            });
        }
        definite.sort_by_key(|d| (d.invoked_ms, d.index));
        Self {
            actor_id,
            definite,
            unseen,
            kinds: std::cell::OnceCell::new(),
            unanswered,
            start,
        }
    }

    /// Per kind, the invocation times of its members, ascending.
    fn kinds(&self) -> &[Vec<u64>] {
        &self.kinds.get_or_init(|| self.group()).0
    }

    fn kind_request(&self, kind: usize) -> &'a LeaseRequest {
        self.kinds.get_or_init(|| self.group()).1[kind]
    }

    fn group(&self) -> (Vec<Vec<u64>>, Vec<&'a LeaseRequest>) {
        type Key<'k> = (LeaseOp, &'k NodeId, Option<FencingToken>, u64);
        let mut groups: BTreeMap<Key<'a>, (Vec<u64>, &'a LeaseRequest)> = BTreeMap::new();
        for unseen in &self.unseen {
            let r = unseen.request;
            let key = (r.op, &r.node_id, r.fencing_token, r.lease_duration_ms);
            groups
                .entry(key)
                .or_insert_with(|| (Vec::new(), r))
                .0
                .push(unseen.invoked_ms);
        }
        groups
            .into_values()
            .map(|(mut invoked, request)| {
                invoked.sort_unstable();
                (invoked, request)
            })
            .unzip()
    }
}

/// Which fields of the model's record are only lower bounds, because an effect nobody saw
/// set them: a chain of unseen grants ends in some token at least one above the last known
/// one, at some instant at least the earliest possible one. Replies reveal them later.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Open {
    token: bool,
    acquired: bool,
    expires: bool,
}

impl Open {
    fn any(self) -> bool {
        self.token || self.acquired || self.expires
    }
}

/// What an unseen effect did to the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// A new tenure.
    Grant,
    /// The same tenure, extended (a renewal, or an acquire by the holder).
    Extend,
    /// The holder gave it up.
    Release,
}

/// A point of the search: the model's record, the last instant used, and which operations
/// were linearized.
#[derive(Clone)]
struct State {
    /// Shared until changed: most steps are refusals that leave it as it is.
    record: Option<Rc<LeaseRecord>>,
    /// Which of the record's fields are only lower bounds.
    open: Open,
    t_last_ms: u64,
    /// Every definite operation before this index is linearized.
    prefix: usize,
    /// Definite operations at or after `prefix` that are linearized, ascending.
    extra: Vec<usize>,
    /// Per kind, how many of its unseen effects took place (missing entries are zero).
    used: Rc<Vec<u32>>,
}

impl State {
    fn is_done(&self, index: usize) -> bool {
        index < self.prefix || self.extra.binary_search(&index).is_ok()
    }

    fn linearized(&self) -> usize {
        self.prefix + self.extra.len()
    }

    fn used(&self, kind: usize) -> usize {
        self.used.get(kind).map_or(0, |&used| used as usize)
    }

    fn mark_done(&mut self, index: usize) {
        if index != self.prefix {
            let at = self
                .extra
                .binary_search(&index)
                .expect_err("not linearized yet");
            self.extra.insert(at, index);
            return;
        }
        self.prefix += 1;
        while self.extra.first() == Some(&self.prefix) {
            self.extra.remove(0);
            self.prefix += 1;
        }
    }

    /// Sets the record after a write. A released record keeps only its token, which is all
    /// `decide` ever looks at in a record without a holder.
    fn set_record(&mut self, written: LeaseRecord, open: Open) {
        if written.holder.is_none() {
            let released = LeaseRecord {
                acquired_at_ms: 0,
                expires_at_ms: 0,
                renewal_count: 0,
                ..written
            };
            self.record = Some(Rc::new(released));
            self.open = Open {
                token: open.token,
                ..Open::default()
            };
            return;
        }
        self.record = Some(Rc::new(written));
        self.open = open;
    }

    /// A refusal that names the record's expiry reveals an open one.
    fn reveal_expiry(&mut self, reply: &Result<Lease, LeaseError>) {
        let revealed = match reply {
            Err(LeaseError::HeldByOther { expires_at_ms, .. }) => *expires_at_ms,
            Err(LeaseError::Expired { expired_at_ms, .. }) => *expired_at_ms,
            _ => return,
        };
        if let (true, Some(record)) = (self.open.expires, self.record.as_mut()) {
            Rc::make_mut(record).expires_at_ms = revealed;
            self.open.expires = false;
        }
    }

    fn same_record_as(&self, other: &State) -> bool {
        self.record == other.record && self.open == other.open
    }

    /// Everything but the used counts, for memoisation with dominance on those.
    fn key(&self) -> StateKey {
        StateKey {
            prefix: self.prefix,
            extra: self.extra.clone(),
            record: self.record.as_deref().map(record_key),
            open: self.open,
            t_last_ms: self.t_last_ms,
        }
    }
}

type RecordKey = (Option<NodeId>, FencingToken, u64, u64, u64);

fn record_key(r: &LeaseRecord) -> RecordKey {
    let times = (r.acquired_at_ms, r.expires_at_ms, r.renewal_count);
    (r.holder.clone(), r.fencing_token, times.0, times.1, times.2)
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct StateKey {
    prefix: usize,
    extra: Vec<usize>,
    record: Option<RecordKey>,
    open: Open,
    t_last_ms: u64,
}

/// One depth-first search over one actor's history.
struct Search<'h, 'a> {
    history: &'h ActorHistory<'a>,
    /// Whether unseen effects are tried at every state, not only where no answered operation
    /// fits.
    effects_everywhere: bool,
    /// Visited branching states, each with the used counts it was visited with: a state
    /// reached again with at least as many unseen effects used has nothing new.
    memo: BTreeMap<StateKey, Vec<Vec<u32>>>,
    explored: u64,
    deepest: usize,
    stuck_at: Option<usize>,
}

impl<'h, 'a> Search<'h, 'a> {
    fn new(history: &'h ActorHistory<'a>, effects_everywhere: bool, explored: u64) -> Self {
        Self {
            history,
            effects_everywhere,
            memo: BTreeMap::new(),
            explored,
            deepest: 0,
            stuck_at: None,
        }
    }

    /// `Some(true)` if a linearization exists, `Some(false)` if none does, `None` at the bound.
    fn run(&mut self) -> Option<bool> {
        let start = &self.history.start;
        let initial = State {
            record: start.record.clone().map(Rc::new),
            open: Open::default(),
            t_last_ms: start.t_last_ms,
            prefix: 0,
            extra: Vec::new(),
            used: Rc::default(),
        };
        let mut pending = vec![initial];
        while let Some(mut state) = pending.pop() {
            loop {
                if state.prefix == self.history.definite.len() {
                    return Some(true);
                }
                self.explored += 1;
                if self.explored > LINEARIZABILITY_SEARCH_STATES_MAX {
                    return None;
                }
                let mut children = self.expand(&state);
                match children.len() {
                    0 => {
                        self.note_dead_end(&state);
                        break;
                    }
                    1 => state = children.pop().expect("one child"),
                    _ => {
                        if !self.first_visit(&state) {
                            break;
                        }
                        pending.extend(children.drain(1..).rev());
                        state = children.pop().expect("first child");
                    }
                }
            }
        }
        Some(false)
    }

    fn note_dead_end(&mut self, state: &State) {
        if state.linearized() >= self.deepest {
            self.deepest = state.linearized();
            self.stuck_at = Some(state.prefix);
        }
    }

    /// Records a visit; false if an equal state with no more effects used was visited.
    fn first_visit(&mut self, state: &State) -> bool {
        let seen = self.memo.entry(state.key()).or_default();
        let used = |counts: &[u32], kind: usize| counts.get(kind).copied().unwrap_or(0);
        let dominated = seen.iter().any(|old| {
            let kinds = old.len().max(state.used.len());
            (0..kinds).all(|k| used(old, k) <= used(&state.used, k))
        });
        if dominated {
            return false;
        }
        seen.push(state.used.to_vec());
        true
    }

    /// The states one step after `state`.
    fn expand(&self, state: &State) -> Vec<State> {
        let (candidates, bound_ms) = self.candidates(state);
        let mut children = Vec::with_capacity(candidates.len());
        let mut goals = Vec::new();
        for &index in &candidates {
            let op = &self.history.definite[index];
            match self.step_definite(state, index) {
                Some(child) => {
                    children.push(child);
                    if self.effects_everywhere {
                        goals.push(Goal::of(op));
                    }
                }
                // An unseen effect may be what this one needs to go first.
                None => goals.push(Goal::of(op)),
            }
        }
        if !goals.is_empty() {
            self.push_effects(state, bound_ms, &goals, &mut children);
        }
        children
    }

    /// The definite operations that may go next (none of the others must precede them), and
    /// the latest response among them, which bounds when an unseen effect can take place.
    fn candidates(&self, state: &State) -> (Vec<usize>, u64) {
        let ops = &self.history.definite;
        let mut bound_ms = u64::MAX;
        let mut end = state.prefix;
        while end < ops.len() && ops[end].invoked_ms <= bound_ms {
            if !state.is_done(end) {
                bound_ms = bound_ms.min(ops[end].responded_ms);
            }
            end += 1;
        }
        let candidates: Vec<usize> = (state.prefix..end)
            .filter(|&i| !state.is_done(i) && ops[i].invoked_ms <= bound_ms)
            .collect();
        let latest_ms = candidates.iter().map(|&i| ops[i].responded_ms).max();
        (candidates, latest_ms.unwrap_or(0))
    }

    /// Linearizes definite operation `index` next, at the earliest instant its reply matches.
    fn step_definite(&self, state: &State, index: usize) -> Option<State> {
        let op = &self.history.definite[index];
        let lo_ms = state.t_last_ms.max(op.invoked_ms);
        if lo_ms > op.responded_ms {
            return None;
        }
        let actor_id = self.history.actor_id;
        for t_ms in instant_candidates(state, op, lo_ms) {
            let decision = if state.open.any() {
                concretize(state, op, t_ms)
                    .into_iter()
                    .map(|record| decide(actor_id, record.as_deref(), op.request, t_ms))
                    .find(|decision| decision.reply == *op.reply)
            } else {
                let decision = decide(actor_id, state.record.as_deref(), op.request, t_ms);
                Some(decision).filter(|decision| decision.reply == *op.reply)
            };
            let Some(decision) = decision else {
                continue;
            };
            let mut next = state.clone();
            next.t_last_ms = t_ms;
            next.mark_done(index);
            match decision.write {
                Some(written) => next.set_record(written, Open::default()),
                None => next.reveal_expiry(op.reply),
            }
            return Some(next);
        }
        None
    }

    /// Adds the states where one more unseen effect took place and brings the record closer
    /// to what one of the next answered operations saw.
    fn push_effects(
        &self,
        state: &State,
        bound_ms: u64,
        goals: &[Goal<'_>],
        children: &mut Vec<State>,
    ) {
        for (kind, members) in self.history.kinds().iter().enumerate() {
            let Some(&invoked_ms) = members.get(state.used(kind)) else {
                continue;
            };
            if invoked_ms > bound_ms {
                continue;
            }
            let request = self.history.kind_request(kind);
            if !goals
                .iter()
                .any(|goal| goal.may_be_helped_by(request, state))
            {
                continue;
            }
            for (mut next, effect) in self.effects(state, request, invoked_ms, bound_ms) {
                if !goals
                    .iter()
                    .any(|goal| goal.helped_by(effect, state, &next))
                {
                    continue;
                }
                let used = Rc::make_mut(&mut next.used);
                if used.len() <= kind {
                    used.resize(kind + 1, 0);
                }
                used[kind] += 1;
                children.push(next);
            }
        }
    }

    /// The records an unseen request can leave, taking effect at some instant from its
    /// invocation on (and no later than `bound_ms`). Effects that change nothing are left out.
    fn effects(
        &self,
        state: &State,
        request: &LeaseRequest,
        invoked_ms: u64,
        bound_ms: u64,
    ) -> Vec<(State, Effect)> {
        let mut children = Vec::new();
        for (record, t_ms) in effect_inputs(state, request, invoked_ms, bound_ms) {
            let decision = decide(self.history.actor_id, record.as_ref(), request, t_ms);
            let Some(written) = decision.write else {
                continue;
            };
            let before_token = record
                .as_ref()
                .map_or(FencingToken::ZERO, |r| r.fencing_token);
            let (effect, open) = if written.holder.is_none() {
                (Effect::Release, state.open)
            } else if written.fencing_token > before_token {
                let open = Open {
                    token: true,
                    acquired: true,
                    expires: true,
                };
                (Effect::Grant, open)
            } else {
                // A token guard pins an open token; an unguarded acquire leaves it open.
                let token = state.open.token && request.fencing_token.is_none();
                let open = Open {
                    token,
                    acquired: state.open.acquired,
                    expires: true,
                };
                (Effect::Extend, open)
            };
            let mut next = state.clone();
            next.set_record(written, open);
            if !next.same_record_as(state) {
                children.push((next, effect));
            }
        }
        children
    }
}

/// The (record, instant) pairs worth deciding an unseen request on: with the lease still
/// valid when it takes effect (an open expiry can be as late as needed), and, for an acquire,
/// after the lease expired. Open times are set to a value within their bounds.
fn effect_inputs(
    state: &State,
    request: &LeaseRequest,
    invoked_ms: u64,
    bound_ms: u64,
) -> Vec<(Option<LeaseRecord>, u64)> {
    let lo_ms = invoked_ms;
    let Some(record) = state.record.as_deref().filter(|r| r.holder.is_some()) else {
        return vec![(state.record.as_deref().cloned(), lo_ms)];
    };
    let mut inputs = Vec::new();
    if state.open.expires || lo_ms < record.expires_at_ms || request.op == LeaseOp::Release {
        let mut valid = record.clone();
        if state.open.expires {
            valid.expires_at_ms = valid.expires_at_ms.max(lo_ms + 1);
        }
        // An open token can be the one the request's guard names.
        match request.fencing_token {
            Some(guard) if state.open.token && guard > valid.fencing_token => {
                valid.fencing_token = guard;
            }
            _ => {}
        }
        inputs.push((Some(valid), lo_ms));
    }
    let expired_ms = lo_ms.max(record.expires_at_ms);
    if request.op == LeaseOp::Acquire && expired_ms <= bound_ms {
        inputs.push((Some(record.clone()), expired_ms));
    }
    inputs
}

/// What an answered operation needs the record to be, as far as unseen effects can help:
/// each effect the search tries must bring the record closer to one candidate's goal, so
/// chains of unseen effects stay as short as the replies demand.
#[derive(Clone, Copy)]
enum Goal<'a> {
    /// A tenure the reply names: holder, token, renewals before the operation, expiry.
    Tenure {
        holder: &'a NodeId,
        token: FencingToken,
        renewals_before: u64,
        expires_at_ms: u64,
    },
    /// A valid lease held by `holder`, expiring at `expires_at_ms` if the reply says.
    Holder {
        holder: &'a NodeId,
        expires_at_ms: Option<u64>,
    },
    /// A valid lease held by `holder` under another tenure than the one it asked about: the
    /// holder's own guarded request was refused although it is the holder.
    OtherTenureOf { holder: &'a NodeId },
    /// No valid holder.
    Free,
}

impl<'a> Goal<'a> {
    fn of(op: &Definite<'a>) -> Self {
        match op.reply {
            Ok(lease) => Goal::Tenure {
                holder: &lease.holder,
                token: lease.fencing_token,
                renewals_before: match op.request.op {
                    LeaseOp::Renew => lease.renewal_count.saturating_sub(1),
                    LeaseOp::Acquire | LeaseOp::Release => lease.renewal_count,
                },
                expires_at_ms: lease.expires_at_ms,
            },
            Err(LeaseError::HeldByOther {
                holder,
                expires_at_ms,
                ..
            }) => Goal::Holder {
                holder,
                expires_at_ms: Some(*expires_at_ms),
            },
            Err(LeaseError::NotHolder {
                holder: Some(holder),
                ..
            }) if *holder == op.request.node_id => Goal::OtherTenureOf { holder },
            Err(LeaseError::NotHolder {
                holder: Some(holder),
                ..
            }) => Goal::Holder {
                holder,
                expires_at_ms: None,
            },
            Err(LeaseError::NotHolder { holder: None, .. }) => Goal::Free,
            Err(_) => Goal::Holder {
                holder: &op.request.node_id,
                expires_at_ms: None,
            },
        }
    }

    /// Whether an effect of `request` on `state` could bring the record closer: a cheap test
    /// before the exact one, [`helped_by`](Self::helped_by).
    fn may_be_helped_by(&self, request: &LeaseRequest, state: &State) -> bool {
        let releases = request.op == LeaseOp::Release;
        match *self {
            Goal::Tenure { holder, token, .. } => {
                let below = state
                    .record
                    .as_deref()
                    .map_or(FencingToken::ZERO, |r| r.fencing_token);
                request.node_id == *holder
                    || releases
                    || (request.op == LeaseOp::Acquire
                        && !state.open.token
                        && below.0 + 1 < token.0)
            }
            Goal::Holder { holder, .. } | Goal::OtherTenureOf { holder } => {
                request.node_id == *holder || releases
            }
            Goal::Free => releases,
        }
    }

    /// Whether `effect`, which turned `before` into `after`, brings the record closer.
    fn helped_by(&self, effect: Effect, before: &State, after: &State) -> bool {
        let Some(a) = after.record.as_deref() else {
            return false;
        };
        let b = before.record.as_deref();
        let b_token = b.map_or(FencingToken::ZERO, |r| r.fencing_token);
        let b_holder = b.and_then(|r| r.holder.as_ref());
        let b_expires_ms = b.map_or(0, |r| r.expires_at_ms);
        let renewals = (b.map_or(0, |r| r.renewal_count), a.renewal_count);
        // Extending what the reply names: renewals up to the count it saw, or once opening an
        // expiry that must become later than it is (without a renewal if the count is known).
        let extends_to = |expires_at_ms: Option<u64>, renewals_before: Option<u64>| {
            let counted =
                renewals_before.is_some_and(|n| renewals.1 > renewals.0 && renewals.1 <= n);
            let later = (renewals_before.is_none() || renewals.1 == renewals.0)
                && !before.open.expires
                && expires_at_ms.is_none_or(|e| e > b_expires_ms);
            counted || later
        };
        match (*self, effect) {
            // A grant to the tenure's holder, or one grant to anyone in between: its token is
            // open, so it stands for any number of unseen tenures.
            (Goal::Tenure { holder, token, .. }, Effect::Grant) => {
                (a.holder.as_ref() == Some(holder) && a.fencing_token <= token)
                    || (!before.open.token && a.fencing_token < token)
            }
            (Goal::Tenure { token, .. }, Effect::Release) => b_token < token,
            (
                Goal::Tenure {
                    holder,
                    token,
                    renewals_before,
                    expires_at_ms,
                },
                Effect::Extend,
            ) => {
                let ours = b_holder == Some(holder)
                    && (b_token == token || (before.open.token && b_token < token));
                ours && extends_to(Some(expires_at_ms), Some(renewals_before))
            }
            (Goal::Holder { holder, .. }, Effect::Grant) => a.holder.as_ref() == Some(holder),
            (Goal::Holder { holder, .. }, Effect::Release) => b_holder != Some(holder),
            (
                Goal::Holder {
                    holder,
                    expires_at_ms,
                },
                Effect::Extend,
            ) => b_holder == Some(holder) && extends_to(expires_at_ms, None),
            (Goal::OtherTenureOf { holder }, Effect::Grant) => a.holder.as_ref() == Some(holder),
            (Goal::OtherTenureOf { .. }, effect) => effect == Effect::Release,
            (Goal::Free, effect) => effect == Effect::Release,
        }
    }
}

/// The instants worth trying for `op`, ascending, within `[lo_ms, op.responded_ms]`: the
/// earliest, the record's expiry (where validity flips), and the instants its reply names.
/// A grant names its instant in its expiry, so for a grant only instants that give that
/// expiry are kept.
fn instant_candidates(state: &State, op: &Definite<'_>, lo_ms: u64) -> Instants {
    let record = state.record.as_deref().filter(|r| r.holder.is_some());
    let mut instants = Instants::default();
    instants.push(lo_ms);
    if let Some(record) = record {
        instants.push(record.expires_at_ms);
    }
    let duration_ms = op.request.lease_duration_ms;
    match op.reply {
        Ok(lease) => {
            instants.push(lease.expires_at_ms.saturating_sub(duration_ms));
            instants.push(lease.acquired_at_ms);
        }
        Err(LeaseError::Expired { expired_at_ms, .. }) => instants.push(*expired_at_ms),
        Err(_) => {}
    }
    instants.retain(|t| (lo_ms..=op.responded_ms).contains(t));
    if let (Ok(lease), LeaseOp::Acquire | LeaseOp::Renew) = (op.reply, op.request.op) {
        // The grant's expiry is `t + duration`, or the record's own if that is later.
        let keeps_old =
            state.open.expires || record.is_some_and(|r| r.expires_at_ms == lease.expires_at_ms);
        instants.retain(|t| keeps_old || t + duration_ms == lease.expires_at_ms);
    }
    instants.sort_and_dedup();
    instants
}

/// At most four instants, without a heap allocation: this runs once per search step.
#[derive(Default)]
struct Instants {
    values: [u64; 4],
    len: usize,
}

impl Instants {
    fn push(&mut self, t_ms: u64) {
        assert!(
            self.len < self.values.len(),
            "at most four candidate instants"
        );
        self.values[self.len] = t_ms;
        self.len += 1;
    }

    fn retain(&mut self, keep: impl Fn(&u64) -> bool) {
        let mut kept = 0;
        for i in 0..self.len {
            if keep(&self.values[i]) {
                self.values[kept] = self.values[i];
                kept += 1;
            }
        }
        self.len = kept;
    }

    fn sort_and_dedup(&mut self) {
        let values = &mut self.values[..self.len];
        values.sort_unstable();
        let mut kept = 0;
        for i in 0..values.len() {
            if kept == 0 || values[i] != values[kept - 1] {
                values[kept] = values[i];
                kept += 1;
            }
        }
        self.len = kept;
    }
}

impl IntoIterator for Instants {
    type Item = u64;
    type IntoIter = std::iter::Take<std::array::IntoIter<u64, 4>>;

    fn into_iter(self) -> Self::IntoIter {
        self.values.into_iter().take(self.len)
    }
}

/// Concrete records standing for `state`'s record when some of its fields are open: each
/// open field becomes its lower bound or a value the operation names above it (the reply's
/// token, or the one before it for a new grant, or the request's guard; the reply's times;
/// for the expiry, the earliest value that keeps the lease valid at `t_ms`). Records that are
/// not well formed are left out.
fn concretize(state: &State, op: &Definite<'_>, t_ms: u64) -> Vec<Option<Rc<LeaseRecord>>> {
    let Some(record) = state.record.as_deref() else {
        return vec![None];
    };
    let reply = op.reply;
    let revealed_expiry = match reply {
        Ok(lease) => Some(lease.expires_at_ms),
        Err(LeaseError::HeldByOther { expires_at_ms, .. }) => Some(*expires_at_ms),
        Err(LeaseError::Expired { expired_at_ms, .. }) => Some(*expired_at_ms),
        Err(_) => None,
    };
    let lease = reply.as_ref().ok();
    let revealed_token = lease.map(|lease| lease.fencing_token.0);
    let token_before_grant = revealed_token.and_then(|token| token.checked_sub(1));
    let guard = op.request.fencing_token.map(|token| token.0);
    let tokens = open_values(
        state.open.token,
        record.fencing_token.0,
        &[revealed_token, token_before_grant, guard],
    );
    let expiries = open_values(
        state.open.expires,
        record.expires_at_ms,
        &[revealed_expiry, Some(t_ms + 1)],
    );
    let acquired = lease.map(|lease| lease.acquired_at_ms);
    let acquisitions = open_values(state.open.acquired, record.acquired_at_ms, &[acquired]);
    let mut records = Vec::new();
    for &token in &tokens {
        for &expires_at_ms in &expiries {
            for &acquired_at_ms in &acquisitions {
                if record.holder.is_some() && acquired_at_ms >= expires_at_ms {
                    continue;
                }
                records.push(Some(Rc::new(LeaseRecord {
                    fencing_token: FencingToken(token),
                    acquired_at_ms,
                    expires_at_ms,
                    ..record.clone()
                })));
            }
        }
    }
    records
}

/// The value itself if not open; else the lower bound and every named value above it.
fn open_values(open: bool, lower_bound: u64, named: &[Option<u64>]) -> Vec<u64> {
    if !open {
        return vec![lower_bound];
    }
    let mut values: Vec<u64> = std::iter::once(lower_bound)
        .chain(
            named
                .iter()
                .flatten()
                .filter(|v| **v >= lower_bound)
                .copied(),
        )
        .collect();
    values.sort_unstable();
    values.dedup();
    values
}

/// Finds the smallest offending window of a non-linearizable actor history: the shortest
/// failing prefix, then the latest quiescent grant it can start from and still fail.
fn offending_window(
    actor_id: &ActorId,
    ops: &[(usize, &HistoryOp)],
) -> Result<OffendingWindow, LinearizabilityError> {
    let cut_ms = shortest_failing_cut(actor_id, ops)?;
    let (start, window) = latest_failing_start(actor_id, ops, cut_ms)?;
    let history = ActorHistory::new(actor_id, &window, cut_ms, start.clone());
    let stuck_at = check_actor(&history)?.stuck_at.and_then(|i| {
        let op = history.definite.get(i)?;
        let (_, shown) = window.iter().find(|(index, _)| *index == op.index)?;
        Some(format!("#{} {shown}", op.index))
    });
    // Unanswered operations from before the window's start are part of the check (they may
    // take effect inside it) but are only counted, not listed.
    let from_ms = start.t_last_ms;
    let mut operations: Vec<(usize, String)> = window
        .iter()
        .filter(|(_, op)| op.invoked_ms >= from_ms && op.invoked_ms <= cut_ms)
        .map(|(index, op)| (*index, op.to_string()))
        .collect();
    operations.sort_by_key(|(index, _)| *index);
    Ok(OffendingWindow {
        from_ms,
        to_ms: cut_ms,
        start: start.description,
        stuck_at,
        operations,
        history_operations: ops.len(),
    })
}

/// The earliest response time such that the history cut there is already not linearizable.
/// Linearizability is prefix-closed, so a binary search over the responses finds it.
fn shortest_failing_cut(
    actor_id: &ActorId,
    ops: &[(usize, &HistoryOp)],
) -> Result<u64, LinearizabilityError> {
    let mut cuts: Vec<u64> = ops
        .iter()
        .filter(|(_, op)| op.reply().is_some())
        .filter_map(|(_, op)| op.responded_ms())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let Some(last) = cuts.len().checked_sub(1) else {
        return Ok(u64::MAX);
    };
    // The cut at the last response holds every answered operation, so it fails; find the
    // first that does.
    let (mut low, mut high) = (0, last);
    while low < high {
        let middle = (low + high) / 2;
        let history = ActorHistory::new(actor_id, ops, cuts[middle], Start::empty());
        if check_actor(&history)?.linearizable {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    Ok(cuts[high])
}

/// Operations with their indices in the whole history.
type IndexedOps<'a> = Vec<(usize, &'a HistoryOp)>;

/// The latest grant that no answered operation overlaps such that the window from it to
/// `cut_ms` still fails, with the window's operations; or the whole prefix.
fn latest_failing_start<'a>(
    actor_id: &ActorId,
    ops: &[(usize, &'a HistoryOp)],
    cut_ms: u64,
) -> Result<(Start, IndexedOps<'a>), LinearizabilityError> {
    let mut tried = 0;
    for position in (0..ops.len()).rev() {
        let (index, op) = ops[position];
        let (Some(Ok(lease)), Some(responded_ms)) = (op.reply(), op.responded_ms()) else {
            continue;
        };
        if responded_ms > cut_ms || op.request.op == LeaseOp::Release || !quiescent(ops, position) {
            continue;
        }
        tried += 1;
        if tried > OFFENDING_WINDOW_STARTS_TRIED_MAX {
            break;
        }
        let start = Start {
            record: Some(record_of(lease)),
            t_last_ms: op.invoked_ms,
            description: format!("from the record granted by #{index} {op}"),
        };
        // Answered operations that ended before the grant are linearized before it (none
        // overlaps it); unanswered ones invoked earlier may still take effect after it.
        let window: Vec<(usize, &HistoryOp)> = ops
            .iter()
            .copied()
            .filter(|(i, o)| *i != index && (o.invoked_ms > responded_ms || o.reply().is_none()))
            .collect();
        let history = ActorHistory::new(actor_id, &window, cut_ms, start.clone());
        if !check_actor(&history)?.linearizable {
            return Ok((start, window));
        }
    }
    Ok((Start::empty(), ops.to_vec()))
}

/// Whether no answered operation's interval overlaps that of `ops[position]`.
fn quiescent(ops: &[(usize, &HistoryOp)], position: usize) -> bool {
    let (index, op) = ops[position];
    let (from_ms, to_ms) = (op.invoked_ms, op.responded_ms().unwrap_or(u64::MAX));
    ops.iter().all(|(i, other)| {
        *i == index
            || other.reply().is_none()
            || other.invoked_ms > to_ms
            || other.responded_ms().is_some_and(|ms| ms < from_ms)
    })
}

fn record_of(lease: &Lease) -> LeaseRecord {
    LeaseRecord {
        holder: Some(lease.holder.clone()),
        fencing_token: lease.fencing_token,
        acquired_at_ms: lease.acquired_at_ms,
        expires_at_ms: lease.expires_at_ms,
        renewal_count: lease.renewal_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kelpie_lease::StoreError;

    const LEASE_MS: u64 = 1_000;

    /// A correct store that records what its clients saw: each request takes effect at the
    /// given instant, inside the interval it is recorded with.
    #[derive(Default)]
    struct Recorded {
        record: Option<LeaseRecord>,
        ops: Vec<HistoryOp>,
    }

    fn actor() -> ActorId {
        ActorId::new("a").unwrap()
    }

    fn request(node: &str, op: LeaseOp, token: Option<u64>) -> LeaseRequest {
        let mut request = LeaseRequest::new(op, NodeId::new(node).unwrap(), LEASE_MS);
        request.fencing_token = token.map(FencingToken);
        request
    }

    impl Recorded {
        /// Applies the request at `at_ms` and records it as invoked at `invoked_ms` and
        /// answered at `responded_ms`; returns the granted token, if any.
        fn answered(
            &mut self,
            request: LeaseRequest,
            (invoked_ms, at_ms, responded_ms): (u64, u64, u64),
        ) -> Option<u64> {
            let reply = self.apply(&request, at_ms);
            self.ops.push(HistoryOp {
                actor_id: actor(),
                request,
                invoked_ms,
                outcome: OpOutcome::Returned {
                    responded_ms,
                    reply: reply.clone(),
                },
            });
            token_of(&reply)
        }

        /// Records a request whose outcome the node never learned; applies it at `at_ms` if
        /// given.
        fn unanswered(&mut self, request: LeaseRequest, invoked_ms: u64, at_ms: Option<u64>) {
            if let Some(at_ms) = at_ms {
                let _ = self.apply(&request, at_ms);
            }
            let error = StoreError::CommitUnknown {
                reason: "no reply".into(),
            };
            self.ops.push(HistoryOp {
                actor_id: actor(),
                request,
                invoked_ms,
                outcome: OpOutcome::Failed {
                    responded_ms: invoked_ms + 200,
                    error,
                },
            });
        }

        fn apply(&mut self, request: &LeaseRequest, at_ms: u64) -> Result<Lease, LeaseError> {
            let decision = decide(&actor(), self.record.as_ref(), request, at_ms);
            if let Some(written) = decision.write {
                self.record = Some(written);
            }
            decision.reply
        }
    }

    fn token_of(reply: &Result<Lease, LeaseError>) -> Option<u64> {
        reply.as_ref().ok().map(|lease| lease.fencing_token.0)
    }

    #[test]
    fn a_correct_sequential_history_is_linearizable() {
        let mut store = Recorded::default();
        let token = store.answered(request("n1", LeaseOp::Acquire, None), (0, 2, 4));
        store.answered(request("n2", LeaseOp::Acquire, None), (10, 11, 12));
        store.answered(request("n1", LeaseOp::Renew, token), (300, 305, 306));
        store.answered(request("n1", LeaseOp::Release, token), (600, 601, 603));
        store.answered(request("n2", LeaseOp::Acquire, None), (610, 615, 620));
        let report = check_history(&store.ops).unwrap();
        assert_eq!(report.operations_checked, 5);
        assert_eq!(report.actors_checked, 1);
    }

    #[test]
    fn concurrent_operations_are_ordered_by_their_effects() {
        let mut store = Recorded::default();
        // n2's acquire is invoked first but takes effect after n1's.
        let n1_token = store.answered(request("n1", LeaseOp::Acquire, None), (5, 8, 30));
        store.answered(request("n2", LeaseOp::Acquire, None), (0, 20, 25));
        // A takeover after expiry, concurrent with n1's late renewal that is refused.
        store.answered(request("n3", LeaseOp::Acquire, None), (1_000, 1_010, 1_040));
        store.answered(request("n1", LeaseOp::Renew, n1_token), (990, 1_020, 1_030));
        store.ops.swap(0, 1);
        check_history(&store.ops).unwrap();
    }

    #[test]
    fn unanswered_operations_may_have_taken_effect_or_not() {
        let mut store = Recorded::default();
        // An acquire whose reply was lost took effect; a later refusal reveals it.
        store.unanswered(request("n1", LeaseOp::Acquire, None), 0, Some(50));
        store.answered(request("n2", LeaseOp::Acquire, None), (100, 101, 102));
        // Its idempotent retry finds the lease, then renewals whose replies were lost count.
        let token = store.answered(request("n1", LeaseOp::Acquire, None), (200, 201, 202));
        for at_ms in [300, 400, 500] {
            store.unanswered(request("n1", LeaseOp::Renew, token), at_ms, Some(at_ms + 1));
        }
        store.unanswered(request("n1", LeaseOp::Renew, token), 600, None);
        store.answered(request("n1", LeaseOp::Renew, token), (700, 702, 703));
        store.answered(request("n2", LeaseOp::Acquire, None), (800, 801, 802));
        // A release that never arrived, then another acquire that never arrived.
        store.unanswered(request("n1", LeaseOp::Release, token), 900, None);
        store.unanswered(request("n3", LeaseOp::Acquire, None), 950, None);
        store.answered(request("n2", LeaseOp::Acquire, None), (1_000, 1_001, 1_002));
        let report = check_history(&store.ops).unwrap();
        assert_eq!(report.unknown_operations, 7);
    }

    #[test]
    fn a_stale_renewal_is_caught_with_its_window() {
        let mut store = Recorded::default();
        for at_ms in [0, 1_000, 2_000] {
            store.answered(
                request("n0", LeaseOp::Acquire, None),
                (at_ms, at_ms, at_ms + 1),
            );
            let token = store.record.as_ref().map(|r| r.fencing_token.0);
            store.answered(
                request("n0", LeaseOp::Release, token),
                (at_ms + 9, at_ms + 9, at_ms + 10),
            );
        }
        let token = store.answered(request("n1", LeaseOp::Acquire, None), (3_000, 3_001, 3_002));
        let before = store.record.clone();
        store.answered(request("n1", LeaseOp::Renew, token), (3_100, 3_101, 3_102));
        // The store decides the next renewal on the record as it was before the last one.
        store.record = before;
        store.answered(request("n1", LeaseOp::Renew, token), (3_200, 3_201, 3_202));
        let error = check_history(&store.ops).unwrap_err();
        let LinearizabilityError::NotLinearizable { actor_id, window } = &error else {
            panic!("expected a violation, got {error}");
        };
        assert_eq!(*actor_id, actor());
        assert_eq!(
            window.to_ms, 3_202,
            "the shortest failing prefix ends there"
        );
        assert_eq!(window.history_operations, 9);
        // The window starts from the last good renewal and holds only the stale one.
        assert!(window.start.contains("#7"), "{}", window.start);
        assert_eq!(window.operations.len(), 1, "{error}");
        assert_eq!(window.operations[0].0, 8);
        let shown = error.to_string();
        assert!(
            shown.contains("renewals 1") && shown.contains("no linearization"),
            "{shown}"
        );
    }

    #[test]
    fn two_holders_with_one_token_are_caught() {
        let mut store = Recorded::default();
        store.answered(request("n1", LeaseOp::Acquire, None), (0, 1, 2));
        let free = store.record.take();
        store.answered(request("n2", LeaseOp::Acquire, None), (10, 11, 12));
        store.record = free;
        // Even with an unanswered release that might explain a hand-over, n2's token repeats n1's.
        store.unanswered(request("n1", LeaseOp::Release, Some(1)), 5, None);
        let error = check_history(&store.ops).unwrap_err();
        assert!(
            matches!(error, LinearizabilityError::NotLinearizable { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_refusal_naming_no_holder_is_caught() {
        let mut store = Recorded::default();
        store.answered(request("n1", LeaseOp::Acquire, None), (0, 1, 2));
        let refused = LeaseError::HeldByOther {
            actor_id: actor(),
            holder: NodeId::new("n9").unwrap(),
            expires_at_ms: 1_001,
        };
        store.ops.push(HistoryOp {
            actor_id: actor(),
            request: request("n2", LeaseOp::Acquire, None),
            invoked_ms: 10,
            outcome: OpOutcome::Returned {
                responded_ms: 12,
                reply: Err(refused),
            },
        });
        assert!(check_history(&store.ops).is_err());
    }

    #[test]
    fn the_models_coverage_marks_are_not_counted() {
        let mut store = Recorded::default();
        store.answered(request("n1", LeaseOp::Acquire, None), (0, 1, 2));
        store.answered(request("n2", LeaseOp::Acquire, None), (2_000, 2_001, 2_002));
        let _ = kelpie_core::coverage::take_hits();
        kelpie_core::coverage::mark("test.before");
        check_history(&store.ops).unwrap();
        let hits = kelpie_core::coverage::take_hits();
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert_eq!(hits.get("test.before"), Some(&1));
    }
}
