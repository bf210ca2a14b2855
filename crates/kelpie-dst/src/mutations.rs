//! Deliberately broken lease protocols. Each breaks one rule of the protocol; running it
//! through the same scenario must make the matching checker fail, which shows the checkers
//! can fail at all. `kelpie sim --inject-bug <name>` runs them too.

use kelpie_core::ActorId;
use kelpie_lease::{decide, DecideFn, Decision, LeaseError, LeaseOp, LeaseRecord, LeaseRequest};

/// A broken protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Acquire grants even when another node holds a valid lease.
    AcquireIgnoresHolder,
    /// Renew succeeds for a node that does not hold the lease.
    RenewIgnoresOwnership,
    /// A new holder receives the previous holder's token.
    TokenNotIncreased,
    /// An expired lease is still refused to other nodes.
    ExpiredNotClaimable,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 4] = [
        Mutation::AcquireIgnoresHolder,
        Mutation::RenewIgnoresOwnership,
        Mutation::TokenNotIncreased,
        Mutation::ExpiredNotClaimable,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::AcquireIgnoresHolder => "acquire-ignores-holder",
            Mutation::RenewIgnoresOwnership => "renew-ignores-ownership",
            Mutation::TokenNotIncreased => "token-not-increased",
            Mutation::ExpiredNotClaimable => "expired-not-claimable",
        }
    }

    /// The mutation called `name`.
    pub fn from_name(name: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The invariant that catches it when run alone.
    pub fn caught_by(self) -> &'static str {
        match self {
            Mutation::AcquireIgnoresHolder => "LeaseUniqueness",
            Mutation::RenewIgnoresOwnership => "RenewalRequiresOwnership",
            Mutation::TokenNotIncreased => "FencingTokenMonotonic",
            Mutation::ExpiredNotClaimable => "ExpiredLeaseClaimable",
        }
    }

    /// The broken decision function.
    pub fn decide_fn(self) -> DecideFn {
        match self {
            Mutation::AcquireIgnoresHolder => acquire_ignores_holder,
            Mutation::RenewIgnoresOwnership => renew_ignores_ownership,
            Mutation::TokenNotIncreased => token_not_increased,
            Mutation::ExpiredNotClaimable => expired_not_claimable,
        }
    }
}

fn acquire_ignores_holder(
    a: &ActorId,
    r: Option<&LeaseRecord>,
    q: &LeaseRequest,
    now: u64,
) -> Decision {
    let free = r.map(|r| LeaseRecord {
        holder: None,
        ..r.clone()
    });
    match q.op {
        LeaseOp::Acquire => decide(a, free.as_ref(), q, now),
        _ => decide(a, r, q, now),
    }
}

fn renew_ignores_ownership(
    a: &ActorId,
    r: Option<&LeaseRecord>,
    q: &LeaseRequest,
    now: u64,
) -> Decision {
    let stolen = r.map(|r| LeaseRecord {
        holder: Some(q.node_id.clone()),
        expires_at_ms: r.expires_at_ms.max(now + 1),
        acquired_at_ms: r.acquired_at_ms.min(now),
        ..r.clone()
    });
    match (q.op, &stolen) {
        (LeaseOp::Renew, Some(_)) => decide(a, stolen.as_ref(), q, now),
        _ => decide(a, r, q, now),
    }
}

fn token_not_increased(
    a: &ActorId,
    r: Option<&LeaseRecord>,
    q: &LeaseRequest,
    now: u64,
) -> Decision {
    let mut decision = decide(a, r, q, now);
    if let (Some(before), Some(written)) = (r, decision.write.as_mut()) {
        written.fencing_token = before.fencing_token;
        if let Ok(lease) = decision.reply.as_mut() {
            lease.fencing_token = before.fencing_token;
        }
    }
    decision
}

fn expired_not_claimable(
    a: &ActorId,
    r: Option<&LeaseRecord>,
    q: &LeaseRequest,
    now: u64,
) -> Decision {
    match (q.op, r.and_then(|r| r.holder.clone())) {
        (LeaseOp::Acquire, Some(holder)) if holder != q.node_id => Decision {
            write: None,
            reply: Err(LeaseError::HeldByOther {
                actor_id: a.clone(),
                holder,
                expires_at_ms: r.map_or(0, |r| r.expires_at_ms),
            }),
        },
        _ => decide(a, r, q, now),
    }
}
