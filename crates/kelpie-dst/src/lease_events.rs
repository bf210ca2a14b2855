//! What happened in a lease run, in simulated-time order: requests and replies, changes of
//! the store's truth, beliefs starting and ending, faults. `kelpie sim` prints the last events
//! before a violation and draws the timeline from them.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::backend::LeaseOp;
use serde::{Deserialize, Serialize};

/// Events a run keeps; older ones are dropped first.
pub const EVENTS_KEPT_MAX: usize = 200_000;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEvent {
    /// Global simulated time.
    pub at_ms: u64,
    /// The node concerned, if any.
    pub node_id: Option<NodeId>,
    /// The actor concerned, if any.
    pub actor_id: Option<ActorId>,
    /// What happened.
    pub kind: LeaseEventKind,
}

/// The kinds of event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LeaseEventKind {
    /// A node sent a request.
    Request {
        /// What it asked.
        op: LeaseOp,
    },
    /// The store granted (or released) it.
    Granted {
        /// What was asked.
        op: LeaseOp,
        /// The lease's token.
        fencing_token: FencingToken,
        /// Store-time expiry of the lease.
        expires_at_ms: u64,
    },
    /// The protocol refused it.
    Refused {
        /// What was asked.
        op: LeaseOp,
        /// Why.
        reason: String,
    },
    /// The store failed it (the write may still have been applied).
    StoreFailed {
        /// What was asked.
        op: LeaseOp,
        /// How.
        reason: String,
    },
    /// The store's record changed.
    Truth {
        /// The holder now, if any.
        holder: Option<NodeId>,
        /// The token now.
        fencing_token: FencingToken,
        /// Store-time expiry now.
        expires_at_ms: u64,
    },
    /// A node started believing it holds the actor.
    BeliefStarted {
        /// The token it believes in.
        fencing_token: FencingToken,
        /// The global instant the belief ends unless renewed.
        until_ms: u64,
    },
    /// A node stopped believing it holds the actor.
    BeliefEnded,
    /// A fault window opened or closed, or a point fault fired.
    Fault {
        /// A short description, e.g. `partition node-1` or `heal`.
        what: String,
    },
    /// A checker found a violation.
    Violation {
        /// The invariant.
        invariant: String,
        /// The checker's message.
        message: String,
    },
}

/// A shared, bounded event log.
#[derive(Clone, Default)]
pub struct EventLog {
    events: Rc<RefCell<VecDeque<LeaseEvent>>>,
    /// Cleared when nobody will read the events (a plain sweep), so recording costs nothing.
    disabled: Rc<std::cell::Cell<bool>>,
}

impl EventLog {
    /// Turns recording on or off.
    pub fn set_enabled(&self, enabled: bool) {
        self.disabled.set(!enabled);
    }

    /// Whether events are recorded; callers skip building events when not.
    pub fn is_enabled(&self) -> bool {
        !self.disabled.get()
    }

    /// Appends an event, dropping the oldest beyond [`EVENTS_KEPT_MAX`].
    pub fn push(
        &self,
        at_ms: u64,
        node: Option<&NodeId>,
        actor: Option<&ActorId>,
        kind: LeaseEventKind,
    ) {
        if !self.is_enabled() {
            return;
        }
        let mut events = self.events.borrow_mut();
        if events.len() == EVENTS_KEPT_MAX {
            events.pop_front();
        }
        events.push_back(LeaseEvent {
            at_ms,
            node_id: node.cloned(),
            actor_id: actor.cloned(),
            kind,
        });
    }

    /// Every event kept, oldest first.
    pub fn to_vec(&self) -> Vec<LeaseEvent> {
        self.events.borrow().iter().cloned().collect()
    }
}
