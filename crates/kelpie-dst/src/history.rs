//! The history of lease operations as the nodes saw them: for every request a node sent to
//! the lease store, when it was sent and what came back when, on global simulated time.
//!
//! The recorder sits where a node meets the network ([`crate::lease_net::NetLeaseStore`]), so
//! the history holds exactly what a client can observe: not when the store applied a request,
//! only that it did so somewhere between the invocation and the response. An operation that
//! timed out, failed at the store or never returned (the node crashed) may or may not have taken
//! effect. [`crate::linearizability`] checks such a history against the store's sequential
//! model.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use kelpie_core::ActorId;

use crate::recycled::Recycled;
use kelpie_lease::{backend::LeaseOp, backend::LeaseRequest, Lease, LeaseError, StoreError};

/// An operation's index in its [`History`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HistoryOpId(pub usize);

/// How an operation ended, as the node saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// No answer was ever seen: the node crashed or stopped while it waited. The operation may
    /// or may not have taken effect, at any time after its invocation.
    Pending,
    /// The store answered with a grant or a refusal.
    Returned {
        /// Global simulated time the answer reached the node.
        responded_ms: u64,
        /// The answer.
        reply: Result<Lease, LeaseError>,
    },
    /// The call failed: no reply in time, or the store failed. The operation may or may not
    /// have taken effect.
    Failed {
        /// Global simulated time the node gave up.
        responded_ms: u64,
        /// Why.
        error: StoreError,
    },
}

/// One lease operation: a request on one actor, its invocation and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryOp {
    /// The actor.
    pub actor_id: ActorId,
    /// The request as sent (its node, op, duration and token guard).
    pub request: LeaseRequest,
    /// Global simulated time the node sent it.
    pub invoked_ms: u64,
    /// How it ended.
    pub outcome: OpOutcome,
}

impl HistoryOp {
    /// The answer, if the store gave one (grant or refusal).
    pub fn reply(&self) -> Option<&Result<Lease, LeaseError>> {
        match &self.outcome {
            OpOutcome::Returned { reply, .. } => Some(reply),
            OpOutcome::Pending | OpOutcome::Failed { .. } => None,
        }
    }

    /// When the node saw the answer or gave up, if it did.
    pub fn responded_ms(&self) -> Option<u64> {
        match &self.outcome {
            OpOutcome::Returned { responded_ms, .. } | OpOutcome::Failed { responded_ms, .. } => {
                Some(*responded_ms)
            }
            OpOutcome::Pending => None,
        }
    }
}

impl fmt::Display for HistoryOp {
    /// One line: node, request, interval and outcome, for failure reports.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let request = &self.request;
        write!(f, "{} {}", request.node_id, request.op.name())?;
        if let Some(token) = request.fencing_token {
            write!(f, "(token {token})")?;
        }
        let until = self
            .responded_ms()
            .map_or_else(|| "never".to_string(), |ms| format!("{ms} ms"));
        write!(f, " [{} ms .. {until}] -> ", self.invoked_ms)?;
        match &self.outcome {
            OpOutcome::Pending => write!(f, "no answer (may have taken effect)"),
            OpOutcome::Failed { error, .. } => write!(f, "failed (may have taken effect): {error}"),
            OpOutcome::Returned {
                reply: Ok(lease), ..
            } => write!(
                f,
                "{} token {}, acquired {} ms, expires {} ms, renewals {}",
                granted_word(request.op),
                lease.fencing_token,
                lease.acquired_at_ms,
                lease.expires_at_ms,
                lease.renewal_count
            ),
            OpOutcome::Returned {
                reply: Err(refusal),
                ..
            } => write!(f, "refused: {refusal}"),
        }
    }
}

fn granted_word(op: LeaseOp) -> &'static str {
    match op {
        LeaseOp::Acquire => "granted",
        LeaseOp::Renew => "renewed",
        LeaseOp::Release => "released",
    }
}

/// A shared, append-only log of lease operations. Cloning shares it. It lives inside one
/// simulation, on its single thread.
#[derive(Clone)]
pub struct History {
    /// A sweep builds one history per seed: a dropped history's allocation is kept for the
    /// next on its thread ([`Recycled`]).
    ops: Rc<RefCell<Recycled<HistoryOp>>>,
}

thread_local! {
    /// The emptied vector of the last history dropped on this thread.
    static SPARE_OPS: RefCell<Vec<HistoryOp>> = const { RefCell::new(Vec::new()) };
}

impl Default for History {
    fn default() -> Self {
        Self {
            ops: Rc::new(RefCell::new(Recycled::new(&SPARE_OPS))),
        }
    }
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that a node sent `request` on `actor_id` at global time `invoked_ms`.
    pub fn invoke(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
        invoked_ms: u64,
    ) -> HistoryOpId {
        let mut ops = self.ops.borrow_mut();
        ops.push(HistoryOp {
            actor_id: actor_id.clone(),
            request: request.clone(),
            invoked_ms,
            outcome: OpOutcome::Pending,
        });
        HistoryOpId(ops.len() - 1)
    }

    /// Records how operation `id` ended.
    ///
    /// # Panics
    /// If `id` is not an operation of this history, or it already ended, or it ended before
    /// it was invoked: each would be a bug in the recorder's caller.
    pub fn respond(&self, id: HistoryOpId, outcome: OpOutcome) {
        let mut ops = self.ops.borrow_mut();
        let op = ops.get_mut(id.0).expect("the id came from invoke");
        assert_eq!(op.outcome, OpOutcome::Pending, "an operation ends once");
        assert!(
            op.responded_ms_of(&outcome) >= op.invoked_ms,
            "an operation ends after it starts"
        );
        op.outcome = outcome;
    }

    /// Operations recorded so far.
    pub fn len(&self) -> usize {
        self.ops.borrow().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.borrow().is_empty()
    }

    /// Runs `f` on the operations, in invocation order, without copying them.
    pub fn with_ops<R>(&self, f: impl FnOnce(&[HistoryOp]) -> R) -> R {
        f(&self.ops.borrow())
    }

    /// A copy of the operations, in invocation order.
    pub fn to_vec(&self) -> Vec<HistoryOp> {
        self.ops.borrow().to_vec()
    }
}

impl HistoryOp {
    fn responded_ms_of(&self, outcome: &OpOutcome) -> u64 {
        match outcome {
            OpOutcome::Returned { responded_ms, .. } | OpOutcome::Failed { responded_ms, .. } => {
                *responded_ms
            }
            OpOutcome::Pending => self.invoked_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kelpie_core::{FencingToken, NodeId};

    fn request(op: LeaseOp) -> LeaseRequest {
        LeaseRequest::new(op, NodeId::new("node-1").unwrap(), 1_000)
    }

    #[test]
    fn records_invocations_and_outcomes_in_order() {
        let history = History::new();
        let actor = ActorId::new("a").unwrap();
        let first = history.invoke(&actor, &request(LeaseOp::Acquire), 10);
        let second = history.invoke(&actor, &request(LeaseOp::Renew), 12);
        let lease = Lease {
            actor_id: actor.clone(),
            holder: NodeId::new("node-1").unwrap(),
            fencing_token: FencingToken(1),
            acquired_at_ms: 11,
            expires_at_ms: 1_011,
            renewal_count: 0,
        };
        history.respond(
            first,
            OpOutcome::Returned {
                responded_ms: 14,
                reply: Ok(lease),
            },
        );
        let error = StoreError::CommitUnknown {
            reason: "timeout".into(),
        };
        history.respond(
            second,
            OpOutcome::Failed {
                responded_ms: 212,
                error,
            },
        );
        history.invoke(&actor, &request(LeaseOp::Release), 300);
        let ops = history.to_vec();
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[0].responded_ms(), Some(14));
        assert!(ops[1].reply().is_none());
        assert_eq!(ops[2].outcome, OpOutcome::Pending);
        let shown = ops[0].to_string();
        assert!(
            shown.contains("node-1 acquire [10 ms .. 14 ms] -> granted token 1"),
            "{shown}"
        );
        assert!(ops[2].to_string().contains("never"), "{}", ops[2]);
    }

    #[test]
    #[should_panic(expected = "an operation ends once")]
    fn an_operation_ends_once() {
        let history = History::new();
        let actor = ActorId::new("a").unwrap();
        let id = history.invoke(&actor, &request(LeaseOp::Acquire), 10);
        let failed = || OpOutcome::Failed {
            responded_ms: 20,
            error: StoreError::Unavailable {
                reason: "down".into(),
            },
        };
        history.respond(id, failed());
        history.respond(id, failed());
    }

    /// A new history starts empty even where it reuses the allocation of a dropped one, and
    /// a history in use is never shared with another.
    #[test]
    fn a_new_history_reuses_a_dropped_ones_allocation_empty() {
        let actor = ActorId::new("a").unwrap();
        let first = History::new();
        for at_ms in 0..100 {
            first.invoke(&actor, &request(LeaseOp::Acquire), at_ms);
        }
        let capacity = first.ops.borrow().capacity();
        let address = first.ops.borrow().as_ptr();
        let alive = History::new();
        alive.invoke(&actor, &request(LeaseOp::Renew), 5);
        assert_ne!(alive.ops.borrow().as_ptr(), address, "in use");
        drop(first);
        let second = History::new();
        assert!(second.is_empty());
        assert_eq!(second.ops.borrow().capacity(), capacity);
        assert_eq!(second.ops.borrow().as_ptr(), address);
        assert_eq!(alive.len(), 1);
        second.invoke(&actor, &request(LeaseOp::Release), 7);
        assert_eq!(second.to_vec()[0].invoked_ms, 7);
    }
}
