//! The smallest offending window of a history that failed: the shortest failing prefix, then
//! the latest quiescent grant it can start from and still fail.

use kelpie_core::ActorId;
use kelpie_lease::{backend::LeaseOp, backend::LeaseRecord, Lease};

use super::actor::{ActorHistory, Start};
use super::search::check_actor_within;
use super::{Delivery, LinearizabilityError, OffendingWindow, LINEARIZABILITY_SEARCH_STATES_MAX};
use crate::history::HistoryOp;

/// Most grants tried as the start of a smaller offending window once a violation is found.
pub const OFFENDING_WINDOW_STARTS_TRIED_MAX: usize = 64;

/// Operations with their indices in the whole history.
type IndexedOps<'a> = Vec<(usize, &'a HistoryOp)>;

/// Finds the smallest offending window of a non-linearizable actor history.
pub(super) fn offending_window(
    actor_id: &ActorId,
    ops: &[(usize, &HistoryOp)],
    delivery: Delivery,
) -> OffendingWindow {
    offending_window_within(actor_id, ops, delivery, LINEARIZABILITY_SEARCH_STATES_MAX)
}

/// [`offending_window`], each search of the narrowing bounded by `states_max` states. The
/// whole history has been shown not linearizable already; a narrowing search that gives up
/// only loses the narrowing, so the window is then the whole history, never an error that
/// would turn the proven violation into a [`LinearizabilityError::SearchBound`].
pub(super) fn offending_window_within(
    actor_id: &ActorId,
    ops: &[(usize, &HistoryOp)],
    delivery: Delivery,
    states_max: u64,
) -> OffendingWindow {
    narrowed_window(actor_id, ops, delivery, states_max).unwrap_or_else(|_| {
        let mut start = Start::empty();
        start.description = format!(
            "{} (the narrowing gave up after {states_max} search states)",
            start.description
        );
        // Every operation: the last answer, or the last request if that is later.
        let last_ms = ops
            .iter()
            .map(|(_, op)| op.responded_ms().unwrap_or(op.invoked_ms))
            .max()
            .unwrap_or(0);
        window_of(ops, last_ms, &start, None)
    })
}

fn narrowed_window(
    actor_id: &ActorId,
    ops: &[(usize, &HistoryOp)],
    delivery: Delivery,
    states_max: u64,
) -> Result<OffendingWindow, LinearizabilityError> {
    let cut_ms = shortest_failing_cut(actor_id, ops, delivery, states_max)?;
    let start = latest_failing_start(actor_id, ops, cut_ms, delivery, states_max)?;
    let history = ActorHistory::new(actor_id, ops, cut_ms, start.clone(), delivery);
    let stuck_at = check_actor_within(&history, states_max)?
        .stuck_at
        .and_then(|i| {
            let op = history.definite.get(i)?;
            Some(format!("#{} {}", op.index, op.op))
        });
    Ok(window_of(ops, cut_ms, &start, stuck_at))
}

/// The window of `ops` from `start` to `cut_ms`.
fn window_of(
    ops: &[(usize, &HistoryOp)],
    cut_ms: u64,
    start: &Start,
    stuck_at: Option<String>,
) -> OffendingWindow {
    // Unanswered operations from before the window's start are part of the check (they may
    // take effect inside it) but are only counted, not listed.
    let from_ms = start.t_min_ms;
    let settled = |op: &HistoryOp| {
        op.reply().is_some() && start.settled_ms.is_some_and(|ms| op.invoked_ms <= ms)
    };
    let mut operations: IndexedOps<'_> = ops
        .iter()
        .copied()
        .filter(|(_, op)| op.invoked_ms >= from_ms && op.invoked_ms <= cut_ms && !settled(op))
        .collect();
    operations.sort_by_key(|(index, _)| *index);
    OffendingWindow {
        from_ms,
        to_ms: cut_ms,
        start: start.description.clone(),
        stuck_at,
        operations: operations
            .into_iter()
            .map(|(index, op)| (index, op.to_string()))
            .collect(),
        history_operations: ops.len(),
    }
}

/// The earliest response time such that the history cut there is already not linearizable.
/// Linearizability is prefix-closed, so a binary search over the responses finds it.
fn shortest_failing_cut(
    actor_id: &ActorId,
    ops: &[(usize, &HistoryOp)],
    delivery: Delivery,
    states_max: u64,
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
        let history = ActorHistory::new(actor_id, ops, cuts[middle], Start::empty(), delivery);
        if check_actor_within(&history, states_max)?.linearizable {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    Ok(cuts[high])
}

/// The latest grant that no answered operation overlaps such that the window from it to
/// `cut_ms` still fails; or the beginning.
fn latest_failing_start(
    actor_id: &ActorId,
    ops: &[(usize, &HistoryOp)],
    cut_ms: u64,
    delivery: Delivery,
    states_max: u64,
) -> Result<Start, LinearizabilityError> {
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
        // Answered operations invoked up to the grant's response ended before it (none
        // overlaps it); unanswered ones, and duplicates, may still take effect after it.
        let start = Start {
            record: Some(record_of(lease)),
            t_min_ms: op.invoked_ms,
            t_max_ms: responded_ms,
            settled_ms: Some(responded_ms),
            description: format!("from the record granted by #{index} {op}"),
        };
        let history = ActorHistory::new(actor_id, ops, cut_ms, start.clone(), delivery);
        if !check_actor_within(&history, states_max)?.linearizable {
            return Ok(start);
        }
    }
    Ok(Start::empty())
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
