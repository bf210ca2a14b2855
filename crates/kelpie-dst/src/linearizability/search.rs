//! The depth-first search of one actor's history (Wing and Gong, with real time): each step
//! places one effect next in the linearization, an answered operation or an unseen one, at a
//! symbolic store instant (see [`super::zone`]). Visited states are memoised (Lowe): a state is
//! skipped if one with the same operations placed and the same record was already explored
//! with a zone that includes its zone and no more unseen effects used.

use std::collections::BTreeMap;
use std::rc::Rc;

use kelpie_lease::{backend::decide, backend::LeaseOp, backend::LeaseRecord};

use super::actor::{ActorHistory, Definite};
use super::model::{can_write_again, for_each_branch, Record, Req, Seen, Write};
use super::zone::{ms, Slot, Zone, A, E, INF, N, T, Z};
use super::{prefetch, LinearizabilityError, LINEARIZABILITY_SEARCH_STATES_MAX, PREFETCH_AHEAD};

/// The restricted first search gets this fraction of the state bound: it is meant to succeed
/// fast or give way (it needed 594 states where the exhaustive search gave up after 2,000,000;
/// with half the bound it wasted up to 1,000,000 states on histories the exhaustive search
/// linearizes at once).
const RESTRICTED_SHARE: u64 = 100;

/// The result of searching one actor's history.
pub(super) struct Outcome {
    pub(super) linearizable: bool,
    pub(super) states_explored: u64,
    /// The first answered operation not linearized on the deepest path, as an index into
    /// [`ActorHistory::definite`].
    pub(super) stuck_at: Option<usize>,
}

/// Searches `history` exhaustively (up to [`LINEARIZABILITY_SEARCH_STATES_MAX`] states).
pub(super) fn check_actor(history: &ActorHistory<'_>) -> Result<Outcome, LinearizabilityError> {
    check_actor_within(history, LINEARIZABILITY_SEARCH_STATES_MAX)
}

/// Searches `history` exhaustively, up to `states_max` states.
pub(super) fn check_actor_within(
    history: &ActorHistory<'_>,
    states_max: u64,
) -> Result<Outcome, LinearizabilityError> {
    let mut explored = 0;
    let mut stuck_at = None;
    // First with unseen effects only where they may help an operation that does not fit (fast
    // on the histories of a correct store), then, if that finds nothing, everywhere: only the
    // second, exhaustive search decides a violation. Both are exact, so a linearization either
    // finds is one.
    for (everywhere, budget) in [(false, states_max / RESTRICTED_SHARE), (true, states_max)] {
        let mut search = Search::new(history, everywhere, explored, budget);
        let found = search.run();
        explored = search.explored.min(budget);
        match found {
            Some(true) => {
                return Ok(Outcome {
                    linearizable: true,
                    states_explored: explored,
                    stuck_at: None,
                })
            }
            // The restricted search only gives up; its dead end is the first guess of where.
            Some(false) | None if !everywhere => stuck_at = search.stuck_at,
            Some(false) => stuck_at = search.stuck_at.or(stuck_at),
            None => {
                return Err(LinearizabilityError::SearchBound {
                    actor_id: history.actor_id.clone(),
                    operations: history.operations(),
                    states_explored: search.explored,
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

/// An effect on the path.
#[derive(Clone, Copy, Debug)]
pub(super) enum Placed {
    /// Where the history starts: the instant of the start record's write.
    Start,
    /// Answered operation `index` of [`ActorHistory::definite`].
    Definite(usize),
    /// Member `member` of unseen kind `kind`.
    Unseen { kind: usize, member: usize },
}

/// One step of a path: what was placed, as instant variable `depth` (0 is zero), and the
/// difference constraints it added, over instant variables.
struct Step {
    parent: Option<Rc<Step>>,
    placed: Placed,
    /// Inline: one allocation per step of a path, not two.
    constraints: [(u32, u32, i64); STEP_CONSTRAINTS_MAX],
    constraints_len: usize,
}

impl Step {
    fn constraints(&self) -> &[(u32, u32, i64)] {
        &self.constraints[..self.constraints_len]
    }
}

/// A point of the search.
#[derive(Clone)]
struct State {
    /// The discrete record.
    record: Record,
    /// The instants the future depends on: the last effect's ([`T`]), the record's
    /// acquisition ([`A`]) and expiry ([`E`]).
    zone: Zone,
    /// What each of those slots is on the path, as (instant variable, offset).
    aliases: [(u32, i64); 4],
    /// Effects placed, the start included: the last one is instant variable `depth`.
    depth: u32,
    /// Every definite operation before this index is linearized.
    prefix: usize,
    /// Definite operations at or after `prefix` that are linearized, ascending.
    extra: Vec<usize>,
    /// Per kind, how many of its unseen effects took place.
    used: Rc<Vec<u32>>,
    path: Rc<Step>,
}

impl State {
    fn is_done(&self, index: usize) -> bool {
        index < self.prefix || self.extra.binary_search(&index).is_ok()
    }

    fn linearized(&self) -> usize {
        self.prefix + self.extra.len()
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
}

/// The memo's key: what must be equal for one state to stand for another.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct MemoKey {
    prefix: usize,
    extra: Vec<usize>,
    record: Record,
}

struct Search<'h, 'a> {
    history: &'h ActorHistory<'a>,
    memo: BTreeMap<MemoKey, Vec<(Zone, Vec<u32>)>>,
    /// Whether unseen effects are tried at every state, not only where they may help an
    /// operation that does not fit there.
    everywhere: bool,
    explored: u64,
    states_max: u64,
    deepest: usize,
    stuck_at: Option<usize>,
}

impl<'h, 'a> Search<'h, 'a> {
    fn new(
        history: &'h ActorHistory<'a>,
        everywhere: bool,
        explored: u64,
        states_max: u64,
    ) -> Self {
        Self {
            history,
            everywhere,
            states_max,
            memo: BTreeMap::new(),
            explored,
            deepest: 0,
            stuck_at: None,
        }
    }

    fn initial(&self) -> State {
        let start = &self.history.start;
        let (t_min, t_max) = (ms(start.t_min_ms), ms(start.t_max_ms));
        let mut zone = Zone::unconstrained();
        let mut aliases = [(0, 0), (1, 0), (0, 0), (0, 0)];
        let mut ok = zone.constrain(Z, T, -t_min) && zone.constrain(T, Z, t_max);
        if let Some(record) = start.record.as_ref().filter(|r| r.holder.is_some()) {
            let (acquired, expires) = (ms(record.acquired_at_ms), ms(record.expires_at_ms));
            ok = ok && zone.fix(A, acquired) && zone.fix(E, expires);
            aliases[A] = (0, acquired);
            aliases[E] = (0, expires);
        }
        assert!(ok, "the start's window is not empty");
        State {
            record: self.history.start_record,
            zone,
            aliases,
            depth: 1,
            prefix: 0,
            extra: Vec::new(),
            used: Rc::new(vec![0; self.history.kinds.len()]),
            path: Rc::new(Step {
                parent: None,
                placed: Placed::Start,
                constraints: {
                    let mut constraints = [(0, 0, 0); STEP_CONSTRAINTS_MAX];
                    constraints[..2].copy_from_slice(&[(0, 1, -t_min), (1, 0, t_max)]);
                    constraints
                },
                constraints_len: 2,
            }),
        }
    }

    /// `Some(true)` if a linearization exists, `Some(false)` if none does, `None` at the bound.
    fn run(&mut self) -> Option<bool> {
        let mut pending = vec![self.initial()];
        // One buffer for every state's children: a state is expanded once per search step.
        let mut children = Vec::new();
        while let Some(mut state) = pending.pop() {
            loop {
                if state.prefix == self.history.definite.len() {
                    Witness::new(self.history, &state).replay();
                    return Some(true);
                }
                self.explored += 1;
                if self.explored > self.states_max {
                    return None;
                }

                self.expand(&state, &mut children);
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

    /// Records a visit; false if a state that stands for this one was explored already.
    fn first_visit(&mut self, state: &State) -> bool {
        let t_min = state.zone.earliest(T);
        let used: Vec<u32> = self
            .history
            .kinds
            .iter()
            .zip(state.used.iter())
            .map(|(kind, &used)| {
                // A kind that can never write again is as good as used up, and so is a member
                // whose window closed before the last effect.
                if can_write_again(state.record, &kind.req) {
                    self.history
                        .first_open(kind.members.as_slice(), used as usize, t_min)
                        as u32
                } else {
                    kind.members.len() as u32
                }
            })
            .collect();
        let key = MemoKey {
            prefix: state.prefix,
            extra: state.extra.clone(),
            record: state.record,
        };
        let seen = self.memo.entry(key).or_default();
        let dominated = seen.iter().any(|(zone, old)| {
            zone.includes(&state.zone) && old.iter().zip(&used).all(|(old, new)| old <= new)
        });
        if dominated {
            return false;
        }
        seen.push((state.zone.clone(), used));
        true
    }

    /// The states one step after `state`, into `children` (emptied first): each answered
    /// operation that may go next, then each unseen effect that may take place next, in every
    /// case of the model that fits.
    fn expand(&self, state: &State, children: &mut Vec<State>) {
        children.clear();
        let definite = &self.history.definite;
        // Operations that may go next: none of the others must precede them in real time.
        // Every effect placed now must come before every unplaced operation's response.
        let mut hi = INF;
        let mut end = state.prefix;
        while end < definite.len() && definite[end].invoked_ms <= hi {
            if !state.is_done(end) {
                hi = hi.min(definite[end].responded_ms);
            }
            end += 1;
        }
        let tail = state.extra.last().map_or(state.prefix, |&last| last + 1);
        let mut token_cap = self.history.token_caps[tail];
        for (index, op) in definite.iter().enumerate().take(tail).skip(state.prefix) {
            if !state.is_done(index) {
                token_cap = token_cap.min(op.seen.token_cap().unwrap_or(u64::MAX));
            }
        }
        // Tokens never go down, so an operation that saw a smaller one can never go.
        if state.record.token > token_cap {
            return;
        }
        let mut unfit = Vec::new();
        for (index, op) in definite.iter().enumerate().take(end).skip(state.prefix) {
            if state.is_done(index) || op.invoked_ms > hi {
                continue;
            }
            let placed = Placed::Definite(index);
            let before = children.len();
            self.place(
                state,
                &op.req,
                (op.invoked_ms, hi),
                Some(&op.seen),
                placed,
                children,
            );
            for child in &mut children[before..] {
                child.mark_done(index);
            }
            if children.len() == before {
                unfit.push(op);
            }
        }
        // The restricted search places unseen effects only where they may help an operation
        // that does not fit: with none, there is nothing more to try here.
        if !self.everywhere && unfit.is_empty() {
            return;
        }
        let t_min = state.zone.earliest(T);
        for (kind_index, kind) in self.history.kinds.iter().enumerate() {
            if !self.everywhere && !unfit.iter().any(|op| may_help(state.record, &kind.req, op)) {
                continue;
            }
            if !can_write_again(state.record, &kind.req) {
                continue;
            }
            let members = kind.members.as_slice();
            let first = self
                .history
                .first_open(members, state.used[kind_index] as usize, t_min);
            for (member, &invoked_ms) in members.iter().enumerate().skip(first) {
                if invoked_ms > hi {
                    break;
                }
                let (lo, top) = match self.history.effect_within_ms {
                    // Unbounded windows all end together: the earliest unused member serves
                    // for every instant.
                    None if member > first => break,
                    None => (invoked_ms, hi),
                    // Member `member` stands for the instants after the previous member's
                    // window closed (before that, the previous one serves), so the branches
                    // are disjoint and each leaves every member it can.
                    Some(within_ms) => {
                        let lo = match member.checked_sub(1) {
                            Some(previous) if member > first => {
                                invoked_ms.max(members[previous] + within_ms + 1)
                            }
                            _ => invoked_ms,
                        };
                        (lo, hi.min(invoked_ms + within_ms))
                    }
                };
                if lo > top {
                    continue;
                }
                let placed = Placed::Unseen {
                    kind: kind_index,
                    member,
                };
                let before = children.len();
                self.place(state, &kind.req, (lo, top), None, placed, children);
                for child in &mut children[before..] {
                    Rc::make_mut(&mut child.used)[kind_index] = member as u32 + 1;
                }
            }
        }
    }

    /// The states where `req` took effect next, at an instant in `[lo, hi]` no earlier than
    /// the last effect, with the reply `seen` (or, unseen, changing the record), pushed onto
    /// `children`.
    fn place(
        &self,
        state: &State,
        req: &Req,
        (lo, hi): (i64, i64),
        seen: Option<&Seen>,
        placed: Placed,
        children: &mut Vec<State>,
    ) {
        let var = state.depth + 1;
        // The window, as the constraints `Zone::enter` adds (for the path).
        let window = [(T, N, 0), (Z, N, -lo), (N, Z, hi)];
        let window = &window[..if hi >= INF { 2 } else { 3 }];
        let mut base = state.zone.clone();
        if !base.enter(lo, hi) {
            return;
        }
        for_each_branch(state.record, req, |branch| {
            // The discrete parts first: a case whose reply differs from the one seen, or that
            // would be placed unseen without changing the record, adds no state whatever its
            // instants, and is cheaper to rule out than its constraints.
            let equalities = match seen {
                Some(seen) => match seen.matches(&branch.reply) {
                    Some(equalities) => equalities,
                    None => return,
                },
                None if !branch.write.changes(state.record) => return,
                None => [None, None],
            };
            // The case's own constraints, then a reply naming an instant pins it:
            // `slot + offset = value`.
            let mut added = [(Z, Z, 0); BRANCH_CONSTRAINTS_MAX];
            let mut added_len = 0;
            for &constraint in branch.constraints() {
                added[added_len] = constraint;
                added_len += 1;
            }
            for (expr, value) in equalities.into_iter().flatten() {
                added[added_len] = (expr.slot, Z, value - expr.offset);
                added[added_len + 1] = (Z, expr.slot, expr.offset - value);
                added_len += 2;
            }
            let added = &added[..added_len];
            let mut zone = base.clone();
            if !added.iter().all(|&(x, y, c)| zone.constrain(x, y, c)) {
                return;
            }
            let alias = |slot: Slot| match slot {
                Z => (0, 0),
                N => (var, 0),
                slot => state.aliases[slot],
            };
            let mut constraints = [(0, 0, 0); STEP_CONSTRAINTS_MAX];
            for (to, &(x, y, c)) in constraints.iter_mut().zip(window.iter().chain(added)) {
                let ((gx, ox), (gy, oy)) = (alias(x), alias(y));
                *to = (gx, gy, c - ox + oy);
            }
            let constraints_len = window.len() + added.len();
            let mut aliases = state.aliases;
            match branch.write {
                Write::Keep => {}
                Write::Set {
                    acquired, expires, ..
                } => {
                    for (slot, expr) in [(A, acquired), (E, expires)] {
                        if expr.slot == N {
                            zone.assign(slot, N, expr.offset);
                            aliases[slot] = (var, expr.offset);
                        } else {
                            debug_assert_eq!(expr.slot, slot, "a record keeps its own time");
                        }
                    }
                }
                Write::Release => {
                    zone.free(A);
                    zone.free(E);
                    aliases[A] = (0, 0);
                    aliases[E] = (0, 0);
                }
            }
            zone.assign(T, N, 0);
            aliases[T] = (var, 0);
            zone.free(N);
            children.push(State {
                record: branch.write.record(state.record),
                zone,
                aliases,
                depth: var,
                prefix: state.prefix,
                extra: state.extra.clone(),
                used: Rc::clone(&state.used),
                path: Rc::new(Step {
                    parent: Some(Rc::clone(&state.path)),
                    placed,
                    constraints,
                    constraints_len,
                }),
            });
        });
    }
}

/// Whether an unseen effect of `req` may bring the record closer to what `op` saw: it is by a
/// node the reply names or by the operation's own node, it releases, or it is an acquire while
/// the reply names a later token. Only the first, restricted search uses it.
fn may_help(record: Record, req: &Req, op: &Definite<'_>) -> bool {
    let releases = req.op == LeaseOp::Release;
    let named = match op.seen {
        Seen::Lease { holder, token, .. } => {
            return req.node == holder
                || releases
                || (req.op == LeaseOp::Acquire && record.token < token);
        }
        Seen::HeldByOther { holder, .. } => Some(holder),
        Seen::NotHolder { holder } => holder,
        Seen::Expired { .. } => None,
        Seen::Impossible => return false,
    };
    releases || req.node == op.req.node || named == Some(req.node)
}

/// Most constraints a case of the model adds to a step: its own (2) and a reply's two
/// equalities (2 each).
const BRANCH_CONSTRAINTS_MAX: usize = 6;

/// Most constraints one step adds: the window (3) and a case's. Inline in [`Step`]: the search
/// makes one for every state.
const STEP_CONSTRAINTS_MAX: usize = 3 + BRANCH_CONSTRAINTS_MAX;

/// A linearization the search found, made concrete: instants that satisfy every constraint of
/// its path, replayed through [`decide`] itself. The search's model is exact, so this always
/// succeeds; if it did not, the checker would have accepted a history on a model that is not
/// the store's, and it says so loudly instead. A linearization proposed from the store's log
/// ([`super::store_log`]) is checked the same way, and there a failure only means the proposal
/// was wrong.
pub(super) struct Witness<'h, 'a> {
    history: &'h ActorHistory<'a>,
    steps: Vec<Placed>,
    instants: Vec<i64>,
}

impl<'h, 'a> Witness<'h, 'a> {
    /// `steps[i]` at instant `instants[i + 1]` (`instants[0]` is zero's; `steps[0]` is
    /// [`Placed::Start`]).
    pub(super) fn proposed(
        history: &'h ActorHistory<'a>,
        steps: Vec<Placed>,
        instants: Vec<i64>,
    ) -> Self {
        Self {
            history,
            steps,
            instants,
        }
    }

    fn new(history: &'h ActorHistory<'a>, state: &State) -> Self {
        // One step per instant variable but zero, each with at most STEP_CONSTRAINTS_MAX.
        let depth = state.depth as usize;
        let mut steps = Vec::with_capacity(depth);
        let mut edges = Vec::with_capacity(depth * STEP_CONSTRAINTS_MAX);
        let mut step = Some(&state.path);
        while let Some(s) = step {
            steps.push(s.placed);
            edges.extend(s.constraints().iter().copied());
            step = s.parent.as_ref();
        }
        steps.reverse();
        // Shortest paths from a virtual source to every variable: `x_a - x_b <= c` is an edge
        // b -> a of weight c, and the distances satisfy every such constraint.
        let vars = steps.len() + 1;
        let mut distance = vec![0i64; vars];
        for round in 0.. {
            assert!(
                round <= vars,
                "linearizability checker bug: the path's constraints are infeasible"
            );
            let mut changed = false;
            for &(a, b, c) in &edges {
                let via = distance[b as usize] + c;
                if via < distance[a as usize] {
                    distance[a as usize] = via;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let zero = distance[0];
        let instants = distance.iter().map(|d| d - zero).collect();
        Self {
            history,
            steps,
            instants,
        }
    }

    /// Replays the linearization through `decide`; panics if it does not give every answered
    /// operation its reply.
    fn replay(&self) {
        if let Err(what) = self.verify() {
            panic!(
                "linearizability checker bug on {}: the linearization found does not replay \
                 through decide: {what}; linearization: {:?} at {:?}",
                self.history.actor_id, self.steps, self.instants
            )
        }
    }

    /// Whether this is a linearization of the history: it starts at the start, places every
    /// answered operation exactly once, within its interval, where `decide` gives it the reply
    /// the node saw, and each unseen effect at most once, within its window, where it writes;
    /// instants never go back. `Err` says the first thing that is not so.
    pub(super) fn verify(&self) -> Result<(), String> {
        let history = self.history;
        let actor_id = history.actor_id;
        if self.instants.len() != self.steps.len() + 1 {
            return Err(format!(
                "{} instants for {} steps",
                self.instants.len(),
                self.steps.len()
            ));
        }
        let mut record: Option<LeaseRecord> = history.start.record.clone();
        let mut last_ms = i64::MIN;
        let mut placed_definite = vec![false; history.definite.len()];
        let mut placed_unseen: Vec<Vec<bool>> = history
            .kinds
            .iter()
            .map(|kind| vec![false; kind.members.len()])
            .collect();
        for (position, placed) in self.steps.iter().enumerate() {
            if let Some(&Placed::Definite(ahead)) = self.steps.get(position + PREFETCH_AHEAD) {
                if let Some(ahead) = history.definite.get(ahead) {
                    prefetch(ahead.op);
                }
            }
            let t_ms = self.instants[position + 1];
            if t_ms < last_ms || t_ms < 0 {
                return Err(format!("instant {t_ms} ms goes back from {last_ms} ms"));
            }
            last_ms = t_ms;
            let (request, expected) = match *placed {
                Placed::Start if position == 0 => {
                    let start = &history.start;
                    if t_ms < ms(start.t_min_ms) || t_ms > ms(start.t_max_ms) {
                        return Err(format!("the start placed at {t_ms} ms"));
                    }
                    continue;
                }
                Placed::Start => return Err(format!("a start at position {position}")),
                Placed::Definite(index) => {
                    let Some(op) = history.definite.get(index) else {
                        return Err(format!("no answered operation {index}"));
                    };
                    if std::mem::replace(&mut placed_definite[index], true) {
                        return Err(format!("{} placed twice", op.op));
                    }
                    if t_ms < op.invoked_ms || t_ms > op.responded_ms {
                        return Err(format!("{} placed at {t_ms} ms", op.op));
                    }
                    (&op.op.request, op.op.reply())
                }
                Placed::Unseen { kind, member } => {
                    let Some(&invoked_ms) =
                        history.kinds.get(kind).and_then(|k| k.members.get(member))
                    else {
                        return Err(format!("no unseen effect {kind}.{member}"));
                    };
                    if std::mem::replace(&mut placed_unseen[kind][member], true) {
                        return Err(format!(
                            "the unseen effect invoked at {invoked_ms} ms placed twice"
                        ));
                    }
                    let closes_ms = history
                        .effect_within_ms
                        .map_or(i64::MAX, |within_ms| invoked_ms + within_ms);
                    if t_ms < invoked_ms || t_ms > closes_ms {
                        return Err(format!(
                            "an unseen effect invoked at {invoked_ms} ms placed at {t_ms} ms"
                        ));
                    }
                    (history.kinds[kind].request, None)
                }
            };
            let decision = decide(actor_id, record.as_ref(), request, t_ms as u64);
            match expected {
                Some(reply) if *reply != decision.reply => {
                    return Err(format!(
                        "at {t_ms} ms decide answers {:?}, the node saw {reply:?}",
                        decision.reply
                    ))
                }
                None if decision.write.is_none() => {
                    return Err(format!(
                        "the unseen {request:?} at {t_ms} ms writes nothing"
                    ))
                }
                _ => {}
            }
            if let Some(written) = decision.write {
                record = Some(written);
            }
        }
        if !matches!(self.steps.first(), Some(Placed::Start)) {
            return Err("the linearization does not begin at the start".into());
        }
        if let Some(missing) = placed_definite.iter().position(|placed| !placed) {
            return Err(format!("{} is not placed", history.definite[missing].op));
        }
        Ok(())
    }
}
