//! The lease decision: a pure function of (stored record, request, store time).
//!
//! Every store calls [`decide`] inside its own atomic step (a mutex, a SQLite transaction, a
//! simulated store's single instant), so the protocol exists exactly once. Safety argument:
//! a lease is granted to a new holder only when the record names no valid holder at the
//! store's current time, and the store applies decisions one at a time, so two valid holders
//! cannot coexist on the store's clock. Each new holder gets `token + 1` over a record that
//! is never deleted, so tokens strictly increase across holders.

use kelpie_core::{ActorId, FencingToken};

use crate::error::LeaseError;
use crate::lease::{Lease, LeaseOp, LeaseRecord, LeaseRequest};

/// Coverage mark: a lease was granted to a new node over another node's expired lease.
pub const MARK_TAKEOVER_AFTER_EXPIRY: &str = "protocol.takeover_after_expiry";
/// Coverage mark: the store decided on a lease whose holder had let it expire.
pub const MARK_EXPIRED_LEASE_SEEN: &str = "protocol.expired_lease_seen";

/// What the store must do: write `write` (if any) in the same atomic step, then answer `reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The record to store, or `None` to leave the store unchanged.
    pub write: Option<LeaseRecord>,
    /// The answer to the caller: the lease granted, renewed or released, or a refusal.
    pub reply: Result<Lease, LeaseError>,
}

/// The signature of [`decide`], so tests can run a deliberately broken protocol through the
/// same stores and show that the checkers catch it.
pub type DecideFn = fn(&ActorId, Option<&LeaseRecord>, &LeaseRequest, u64) -> Decision;

/// Decides `request` on `actor_id` given its stored `record` at store time `store_now_ms`.
///
/// # Panics
/// If a grant or renewal's `request.lease_duration_ms` is zero, or its expiry overflows
/// `u64`: the request was not built from a [`LeaseConfig`](crate::LeaseConfig), which every
/// manager builds its requests from (see [`LeaseRequest::lease_duration_ms`]).
pub fn decide(
    actor_id: &ActorId,
    record: Option<&LeaseRecord>,
    request: &LeaseRequest,
    store_now_ms: u64,
) -> Decision {
    if let Some(record) = record {
        assert_record_well_formed(record);
        if record.holder.is_some() && record.valid_holder(store_now_ms).is_none() {
            kelpie_core::coverage::mark(MARK_EXPIRED_LEASE_SEEN);
        }
    }
    let decision = match request.op {
        LeaseOp::Acquire => decide_acquire(actor_id, record, request, store_now_ms),
        LeaseOp::Renew => decide_renew(actor_id, record, request, store_now_ms),
        LeaseOp::Release => decide_release(actor_id, record, request, store_now_ms),
    };
    assert_decision_sound(record, request, store_now_ms, &decision);
    decision
}

fn decide_acquire(
    actor_id: &ActorId,
    record: Option<&LeaseRecord>,
    request: &LeaseRequest,
    store_now_ms: u64,
) -> Decision {
    let previous_token = record.map_or(FencingToken::ZERO, |r| r.fencing_token);
    if let Some(record) = record {
        match record.valid_holder(store_now_ms) {
            // Idempotent in holder and token: a retry after a lost reply finds the lease it
            // already holds. The expiry is refreshed as a renewal would, because the caller
            // measures its belief from when it sent *this* request; answering with the old
            // expiry would let that belief outlive the store's truth.
            Some(holder) if *holder == request.node_id => {
                let refreshed = LeaseRecord {
                    expires_at_ms: expiry_ms(store_now_ms, request.lease_duration_ms)
                        .max(record.expires_at_ms),
                    ..record.clone()
                };
                return grant(actor_id, refreshed);
            }
            Some(holder) => {
                return refuse(LeaseError::HeldByOther {
                    actor_id: actor_id.clone(),
                    holder: holder.clone(),
                    expires_at_ms: record.expires_at_ms,
                });
            }
            None => {}
        }
    }
    if record.is_some_and(|r| r.holder.as_ref().is_some_and(|h| *h != request.node_id)) {
        kelpie_core::coverage::mark(MARK_TAKEOVER_AFTER_EXPIRY);
    }
    let granted = LeaseRecord {
        holder: Some(request.node_id.clone()),
        fencing_token: previous_token.next(),
        acquired_at_ms: store_now_ms,
        expires_at_ms: expiry_ms(store_now_ms, request.lease_duration_ms),
        renewal_count: 0,
    };
    grant(actor_id, granted)
}

fn decide_renew(
    actor_id: &ActorId,
    record: Option<&LeaseRecord>,
    request: &LeaseRequest,
    store_now_ms: u64,
) -> Decision {
    let Some(record) = record.filter(|r| holds_with_token(r, request)) else {
        return refuse(not_holder(actor_id, record, request, store_now_ms));
    };
    if store_now_ms >= record.expires_at_ms {
        return refuse(LeaseError::Expired {
            actor_id: actor_id.clone(),
            node_id: request.node_id.clone(),
            expired_at_ms: record.expires_at_ms,
        });
    }
    let renewed = LeaseRecord {
        expires_at_ms: expiry_ms(store_now_ms, request.lease_duration_ms).max(record.expires_at_ms),
        renewal_count: record.renewal_count.saturating_add(1),
        ..record.clone()
    };
    grant(actor_id, renewed)
}

fn decide_release(
    actor_id: &ActorId,
    record: Option<&LeaseRecord>,
    request: &LeaseRequest,
    store_now_ms: u64,
) -> Decision {
    // The last holder may release even after expiry: nobody else holds it, and clearing the
    // holder only makes the lease free sooner.
    let Some(record) = record.filter(|r| holds_with_token(r, request)) else {
        return refuse(not_holder(actor_id, record, request, store_now_ms));
    };
    let released_lease = record.lease(actor_id).expect("holder checked above");
    // Field by field rather than `..record.clone()`, which would clone the holder only to drop
    // it: an atomic increment and decrement on every release.
    let released = LeaseRecord {
        holder: None,
        fencing_token: record.fencing_token,
        acquired_at_ms: record.acquired_at_ms,
        expires_at_ms: store_now_ms,
        renewal_count: record.renewal_count,
    };
    Decision {
        write: Some(released),
        reply: Ok(released_lease),
    }
}

/// Whether the record names the requester as holder, with the token it names (if any).
fn holds_with_token(record: &LeaseRecord, request: &LeaseRequest) -> bool {
    record.holder.as_ref() == Some(&request.node_id)
        && request
            .fencing_token
            .is_none_or(|token| token == record.fencing_token)
}

fn not_holder(
    actor_id: &ActorId,
    record: Option<&LeaseRecord>,
    request: &LeaseRequest,
    store_now_ms: u64,
) -> LeaseError {
    LeaseError::NotHolder {
        actor_id: actor_id.clone(),
        node_id: request.node_id.clone(),
        holder: record.and_then(|r| r.valid_holder(store_now_ms)).cloned(),
    }
}

fn grant(actor_id: &ActorId, record: LeaseRecord) -> Decision {
    let lease = record
        .lease(actor_id)
        .expect("granted record names a holder");
    Decision {
        write: Some(record),
        reply: Ok(lease),
    }
}

fn refuse(error: LeaseError) -> Decision {
    Decision {
        write: None,
        reply: Err(error),
    }
}

fn expiry_ms(store_now_ms: u64, lease_duration_ms: u64) -> u64 {
    assert!(
        lease_duration_ms > 0,
        "lease duration was validated to be positive"
    );
    store_now_ms
        .checked_add(lease_duration_ms)
        .expect("store time + lease duration overflowed")
}

/// A stored record's own consistency. Stores call this when they load a record back, so a
/// record that was written well-formed and read back otherwise is caught at the boundary.
/// Inlined: it runs several times per request, and its two comparisons cost less than a call.
#[inline]
pub fn assert_record_well_formed(record: &LeaseRecord) {
    assert!(
        record.fencing_token > FencingToken::ZERO,
        "a stored record always has a token"
    );
    assert!(
        record.holder.is_none() || record.acquired_at_ms < record.expires_at_ms,
        "a held lease expires after it was acquired: {record:?}"
    );
}

/// Checks the decision against the protocol's rules, independently of how it was reached.
fn assert_decision_sound(
    record: Option<&LeaseRecord>,
    request: &LeaseRequest,
    store_now_ms: u64,
    decision: &Decision,
) {
    let Some(written) = &decision.write else {
        return;
    };
    assert_record_well_formed(written);
    let previous_token = record.map_or(FencingToken::ZERO, |r| r.fencing_token);
    assert!(
        written.fencing_token >= previous_token,
        "tokens never go down"
    );
    let previous_valid_holder = record.and_then(|r| r.valid_holder(store_now_ms));
    if written.holder.is_some() && written.holder.as_ref() != previous_valid_holder {
        assert!(
            written.fencing_token > previous_token,
            "a new holder gets a larger token"
        );
        assert!(
            previous_valid_holder.is_none(),
            "a valid lease is never handed to another node"
        );
    }
    if request.op != LeaseOp::Acquire {
        assert_eq!(
            written.fencing_token, previous_token,
            "renew and release keep the token"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kelpie_core::NodeId;

    fn actor() -> ActorId {
        ActorId::new("a").unwrap()
    }

    fn request(op: LeaseOp, node: &str) -> LeaseRequest {
        LeaseRequest::new(op, NodeId::new(node).unwrap(), 100)
    }

    fn apply(record: &mut Option<LeaseRecord>, op: LeaseOp, node: &str, now_ms: u64) -> Decision {
        let decision = decide(&actor(), record.as_ref(), &request(op, node), now_ms);
        if let Some(written) = &decision.write {
            *record = Some(written.clone());
        }
        decision
    }

    #[test]
    fn acquire_grants_free_lease_with_first_token() {
        let mut record = None;
        let lease = apply(&mut record, LeaseOp::Acquire, "n1", 10)
            .reply
            .unwrap();
        assert_eq!(lease.fencing_token, FencingToken(1));
        assert_eq!(lease.expires_at_ms, 110);
        assert_eq!(record.unwrap().holder, Some(NodeId::new("n1").unwrap()));
    }

    #[test]
    fn acquire_is_idempotent_and_refuses_others_until_expiry() {
        let mut record = None;
        let first = apply(&mut record, LeaseOp::Acquire, "n1", 0).reply.unwrap();
        let again = apply(&mut record, LeaseOp::Acquire, "n1", 50)
            .reply
            .unwrap();
        assert_eq!(again.fencing_token, first.fencing_token);
        assert_eq!((again.acquired_at_ms, again.expires_at_ms), (0, 150));
        assert_eq!(again.renewal_count, first.renewal_count);
        let refused = apply(&mut record, LeaseOp::Acquire, "n2", 149)
            .reply
            .unwrap_err();
        assert!(matches!(
            refused,
            LeaseError::HeldByOther {
                expires_at_ms: 150,
                ..
            }
        ));
        let taken = apply(&mut record, LeaseOp::Acquire, "n2", 150)
            .reply
            .unwrap();
        assert_eq!(taken.fencing_token, FencingToken(2));
    }

    #[test]
    fn renew_keeps_token_and_refuses_non_holders_and_expired() {
        let mut record = None;
        apply(&mut record, LeaseOp::Acquire, "n1", 0).reply.unwrap();
        let renewed = apply(&mut record, LeaseOp::Renew, "n1", 60).reply.unwrap();
        assert_eq!(
            (renewed.fencing_token, renewed.expires_at_ms),
            (FencingToken(1), 160)
        );
        assert_eq!(renewed.renewal_count, 1);
        let other = apply(&mut record, LeaseOp::Renew, "n2", 61)
            .reply
            .unwrap_err();
        assert!(matches!(other, LeaseError::NotHolder { .. }));
        let late = apply(&mut record, LeaseOp::Renew, "n1", 160)
            .reply
            .unwrap_err();
        assert!(matches!(
            late,
            LeaseError::Expired {
                expired_at_ms: 160,
                ..
            }
        ));
    }

    #[test]
    fn token_guard_refuses_requests_from_an_earlier_tenure() {
        let mut record = None;
        let first = apply(&mut record, LeaseOp::Acquire, "n1", 0).reply.unwrap();
        apply(&mut record, LeaseOp::Release, "n1", 1).reply.unwrap();
        apply(&mut record, LeaseOp::Acquire, "n1", 2).reply.unwrap();
        let mut stale = request(LeaseOp::Release, "n1");
        stale.fencing_token = Some(first.fencing_token);
        let refused = decide(&actor(), record.as_ref(), &stale, 3);
        assert!(matches!(refused.reply, Err(LeaseError::NotHolder { .. })));
        assert!(refused.write.is_none());
        stale.fencing_token = record.as_ref().map(|r| r.fencing_token);
        assert!(decide(&actor(), record.as_ref(), &stale, 3).reply.is_ok());
    }

    #[test]
    fn release_frees_lease_and_next_token_is_larger() {
        let mut record = None;
        apply(&mut record, LeaseOp::Acquire, "n1", 0).reply.unwrap();
        assert!(apply(&mut record, LeaseOp::Release, "n2", 1).reply.is_err());
        apply(&mut record, LeaseOp::Release, "n1", 2).reply.unwrap();
        assert!(record.as_ref().unwrap().holder.is_none());
        assert!(apply(&mut record, LeaseOp::Release, "n1", 3).reply.is_err());
        let next = apply(&mut record, LeaseOp::Acquire, "n2", 3).reply.unwrap();
        assert_eq!(next.fencing_token, FencingToken(2));
    }
}
