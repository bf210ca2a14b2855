//! One actor's operations, prepared for the search: answered operations with their replies in
//! the model's terms, and the effects nobody saw, grouped by identical request.

use std::collections::BTreeMap;

use kelpie_core::{ActorId, NodeId};
use kelpie_lease::{backend::LeaseRecord, backend::LeaseRequest, LeaseError};

use super::model::{Holding, Node, Record, Req, Seen};
use super::zone::ms;
use super::{prefetch, Delivery, Duplicates, PREFETCH_AHEAD};
use crate::history::{HistoryOp, OpOutcome};

/// An operation the node got an answer to: it took effect exactly once, at one store instant
/// within its interval, with the reply the node saw.
pub(super) struct Definite<'a> {
    /// Its index in the whole history.
    pub(super) index: usize,
    pub(super) op: &'a HistoryOp,
    pub(super) req: Req,
    pub(super) invoked_ms: i64,
    pub(super) responded_ms: i64,
    pub(super) seen: Seen,
}

/// Effects nobody saw of one request (node, op, token guard, duration): each took effect at
/// most once, at any instant from its invocation on (up to [`ActorHistory::effect_within_ms`]
/// later where that is bounded). Members are interchangeable but for their invocation, so the
/// search uses them in invocation order: where two of them took effect, the earlier invoked can
/// always be taken as the earlier effect (their windows have one length, so swapping them keeps
/// both inside their windows).
pub(super) struct Kind<'a> {
    pub(super) req: Req,
    pub(super) request: &'a LeaseRequest,
    /// Invocation instants, ascending.
    pub(super) members: Vec<i64>,
}

/// Where a history (or a window of it) starts.
#[derive(Clone)]
pub(super) struct Start {
    /// The record at the start.
    pub(super) record: Option<LeaseRecord>,
    /// The earliest instant of the start record's write; effects come no earlier.
    pub(super) t_min_ms: u64,
    /// The latest instant of that write.
    pub(super) t_max_ms: u64,
    /// Answered operations invoked up to this instant took effect before the start (their
    /// duplicates, if any, may still come later).
    pub(super) settled_ms: Option<u64>,
    pub(super) description: String,
}

impl Start {
    pub(super) fn empty() -> Self {
        Self {
            record: None,
            t_min_ms: 0,
            t_max_ms: 0,
            settled_ms: None,
            description: "from the beginning of the history (no record)".into(),
        }
    }
}

/// One actor's operations, prepared for the search.
pub(super) struct ActorHistory<'a> {
    pub(super) actor_id: &'a ActorId,
    /// Answered operations, by invocation time.
    pub(super) definite: Vec<Definite<'a>>,
    /// Effects nobody saw: unanswered operations, and second deliveries where the network can
    /// duplicate.
    pub(super) kinds: Vec<Kind<'a>>,
    /// How many operations were unanswered.
    pub(super) unanswered: usize,
    pub(super) start: Start,
    /// The start record in the model's terms.
    pub(super) start_record: Record,
    /// Every effect takes place within this many ms of its invocation (`None`: any time later).
    pub(super) effect_within_ms: Option<i64>,
    /// `token_caps[i]`: the smallest token a reply of `definite[i..]` names (tokens never go
    /// down, so the record's token can never exceed it while those are to come).
    pub(super) token_caps: Vec<u64>,
}

impl<'a> ActorHistory<'a> {
    /// The operations invoked up to `cut_ms`; those not answered by then count as unanswered.
    pub(super) fn new(
        actor_id: &'a ActorId,
        ops: &[(usize, &'a HistoryOp)],
        cut_ms: u64,
        start: Start,
        delivery: Delivery,
    ) -> Self {
        let duplicates = delivery.duplicates;
        // Nodes numbered in order of appearance; hashed, as a sorted map compared their names
        // at every operation. An id is cloned only the first time. An actor's operations and
        // the replies to them mostly name the node named just before (a holder renewing): that
        // one is compared (two words, for a short id or a clone of a long one) before any
        // hashing.
        let mut table: indexmap::IndexSet<NodeId, foldhash::fast::FixedState> =
            indexmap::IndexSet::default();
        let mut last = None;
        let mut intern = |node: &NodeId| {
            if let Some(index) = last.filter(|&index: &usize| table[index] == *node) {
                return index as Node;
            }
            let index = match table.get_index_of(node) {
                Some(index) => index,
                None => table.insert_full(node.clone()).0,
            };
            last = Some(index);
            index as Node
        };
        let mut definite = Vec::with_capacity(ops.len());
        let mut unseen: BTreeMap<Req, (&'a LeaseRequest, Vec<i64>)> = BTreeMap::new();
        let mut unanswered = 0;
        for (at, &(index, op)) in ops.iter().enumerate() {
            if let Some(&(_, ahead)) = ops.get(at + PREFETCH_AHEAD) {
                prefetch(ahead);
            }
            if op.invoked_ms > cut_ms {
                continue;
            }
            let request = &op.request;
            let req = Req {
                op: request.op,
                node: intern(&request.node_id),
                guard: request.fencing_token.map(|token| token.0),
                duration_ms: ms(request.lease_duration_ms),
            };
            let invoked_ms = ms(op.invoked_ms);
            let mut add_unseen = || {
                let entry = unseen.entry(req).or_insert_with(|| (request, Vec::new()));
                entry.1.push(invoked_ms);
            };
            let settled = start.settled_ms.is_some_and(|ms| op.invoked_ms <= ms);
            match &op.outcome {
                OpOutcome::Returned {
                    responded_ms,
                    reply,
                } if *responded_ms <= cut_ms && !matches!(reply, Err(LeaseError::Store(_))) => {
                    if !settled {
                        definite.push(Definite {
                            index,
                            op,
                            req,
                            invoked_ms,
                            responded_ms: ms(*responded_ms),
                            seen: Seen::of(actor_id, request, reply, &mut intern),
                        });
                    }
                }
                _ => {
                    unanswered += 1;
                    add_unseen();
                }
            }
            // A duplicated request takes effect once more, unseen, at any time after it was
            // sent.
            if duplicates == Duplicates::Possible {
                add_unseen();
            }
        }
        definite.sort_by_key(|d| (d.invoked_ms, d.index));
        let kinds = unseen
            .into_iter()
            .map(|(req, (request, mut members))| {
                members.sort_unstable();
                Kind {
                    req,
                    request,
                    members,
                }
            })
            .collect();
        let start_record = start.record.as_ref().map_or(Record::default(), |r| Record {
            token: r.fencing_token.0,
            holding: r.holder.as_ref().map(|holder| Holding {
                holder: intern(holder),
                renewals: r.renewal_count,
            }),
        });
        let mut token_caps = vec![u64::MAX; definite.len() + 1];
        for (i, op) in definite.iter().enumerate().rev() {
            token_caps[i] = token_caps[i + 1].min(op.seen.token_cap().unwrap_or(u64::MAX));
        }
        Self {
            actor_id,
            effect_within_ms: delivery.effect_within_ms.map(ms),
            token_caps,
            definite,
            kinds,
            unanswered,
            start,
            start_record,
        }
    }

    /// The first of a kind's `members` at or after `used` whose window is still open when the
    /// last effect was at `t_min` at the earliest: members whose window closed before can
    /// never take place.
    pub(super) fn first_open(&self, members: &[i64], used: usize, t_min: i64) -> usize {
        match self.effect_within_ms {
            None => used,
            Some(within_ms) => {
                used.max(members.partition_point(|&invoked_ms| invoked_ms + within_ms < t_min))
            }
        }
    }

    /// Operations in the search: answered ones and unseen effects' requests.
    pub(super) fn operations(&self) -> usize {
        self.definite.len() + self.unanswered
    }
}
