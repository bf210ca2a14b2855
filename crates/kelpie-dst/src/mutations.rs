//! Deliberately broken variants of the lease layer, owned by the test world: four decision
//! functions that each break one rule of the protocol (the simulated store applies them in
//! place of `decide`), two keepers (through `kelpie-lease`'s `mutations` feature) and a store
//! that reads stale records. Running one through the scenario, with every checker on, must
//! make the invariant it breaks fail first, which shows the checkers can fail at all.
//! `kelpie sim --inject-bug <name>` runs each of them.

use kelpie_core::ActorId;
use kelpie_lease::{
    backend::decide, backend::DecideFn, backend::Decision, backend::LeaseOp, backend::LeaseRecord,
    backend::LeaseRequest, LeaseError,
};

use crate::sim_lease_store::StoreWriteMutation;
use crate::swarm_manager::SwarmStore;
use crate::LeaseScenario;
use kelpie_lease::EtcdMutation;

/// What reports a failed linearizability check, among the invariants' names.
pub const LINEARIZABILITY: &str = "Linearizability";

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
    /// The keeper measures its belief from the reply's arrival instead of the request's
    /// sending.
    BeliefFromReply,
    /// The keeper assumes no clock drift, while clocks do drift.
    NoDriftMargin,
    /// The store sometimes decides a request on the previous version of the record.
    StaleReads,
    /// The store writes a takeover of an expired lease as an extension of the old holder's.
    StoreExtendsExpiredLeases,
    /// The store writes a takeover with the previous holder's token.
    StoreKeepsOldToken,
    /// The etcd backend acquires with a blind put, no compare on the key's version.
    EtcdBlindPut,
    /// The etcd backend takes the token from the key's `mod_revision`, which renewals change.
    EtcdModRevisionToken,
    /// The etcd backend measures a session's confirmed expiry from a keepalive's reply.
    EtcdBeliefFromReply,
    /// The etcd backend trusts a watch's deletion event: its next acquire puts blindly.
    EtcdTrustWatch,
    /// The etcd backend takes a keepalive that found its session expired as one that kept it.
    EtcdIgnoreExpiredKeepAlive,
    /// The simulated etcd serves range reads from the keys as they were before its latest
    /// write.
    EtcdStaleReads,
}

/// The size of a `kelpie sim` run: nodes, actors, simulated seconds per seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimSize {
    /// Simulated nodes.
    pub nodes: u64,
    /// Contended actors.
    pub actors: u64,
    /// Simulated seconds per seed.
    pub sim_secs: u64,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 15] = [
        Mutation::AcquireIgnoresHolder,
        Mutation::RenewIgnoresOwnership,
        Mutation::TokenNotIncreased,
        Mutation::ExpiredNotClaimable,
        Mutation::BeliefFromReply,
        Mutation::NoDriftMargin,
        Mutation::StaleReads,
        Mutation::StoreExtendsExpiredLeases,
        Mutation::StoreKeepsOldToken,
        Mutation::EtcdBlindPut,
        Mutation::EtcdModRevisionToken,
        Mutation::EtcdBeliefFromReply,
        Mutation::EtcdTrustWatch,
        Mutation::EtcdIgnoreExpiredKeepAlive,
        Mutation::EtcdStaleReads,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::AcquireIgnoresHolder => "acquire-ignores-holder",
            Mutation::RenewIgnoresOwnership => "renew-ignores-ownership",
            Mutation::TokenNotIncreased => "token-not-increased",
            Mutation::ExpiredNotClaimable => "expired-not-claimable",
            Mutation::BeliefFromReply => "belief-from-reply",
            Mutation::NoDriftMargin => "no-drift-margin",
            Mutation::StaleReads => "stale-reads",
            Mutation::StoreExtendsExpiredLeases => "store-extends-expired-leases",
            Mutation::StoreKeepsOldToken => "store-keeps-old-token",
            Mutation::EtcdBlindPut => "etcd-blind-put",
            Mutation::EtcdModRevisionToken => "etcd-mod-revision-token",
            Mutation::EtcdBeliefFromReply => "etcd-belief-from-reply",
            Mutation::EtcdTrustWatch => "etcd-trust-watch",
            Mutation::EtcdIgnoreExpiredKeepAlive => "etcd-ignore-expired-keepalive",
            Mutation::EtcdStaleReads => "etcd-stale-reads",
        }
    }

    /// The `kelpie sim` options the mutation runs with besides `--inject-bug`: the etcd
    /// backend's on `--store etcd`.
    pub fn sim_args(self) -> &'static [&'static str] {
        match self {
            _ if self.on_etcd() => &["--store", "etcd"],
            _ => &[],
        }
    }

    /// The lease duration the mutation runs at when asked for `lease_duration_ms`: a keepalive
    /// counted from its reply only outlasts etcd's expiry where the session's TTL is the
    /// lease, so `etcd-belief-from-reply` rounds the lease up to whole seconds, at least etcd's
    /// 2 s minimum TTL (below that, the TTL's slack makes the mutation harmless). Every other
    /// mutation runs at the duration asked for.
    pub fn lease_duration_ms(self, lease_duration_ms: u64) -> u64 {
        match self {
            Mutation::EtcdBeliefFromReply => lease_duration_ms.div_ceil(1_000).max(2) * 1_000,
            _ => lease_duration_ms,
        }
    }

    /// The smallest run the mutation is checked in under `kelpie sim`: at least this many
    /// nodes, actors and simulated seconds per seed. `etcd-belief-from-reply` and
    /// `etcd-ignore-expired-keepalive` surface only when a node's etcd session runs out with
    /// a keepalive on its way, which 3 nodes, 2 actors and 20 s (the defaults) make rare: 3
    /// and 6 of 200 seeds from 1 failed, so 100 seeds often passed. With 5 nodes, 20 actors
    /// and 60 s, 120 and 36 of 200 seeds from 7,000 fail. Every other mutation runs at any size.
    pub fn sim_size_min(self) -> SimSize {
        match self {
            Mutation::EtcdBeliefFromReply | Mutation::EtcdIgnoreExpiredKeepAlive => SimSize {
                nodes: 5,
                actors: 20,
                sim_secs: 60,
            },
            _ => SimSize {
                nodes: 1,
                actors: 1,
                sim_secs: 1,
            },
        }
    }

    /// Whether it breaks the etcd backend or the simulated etcd: it runs only on `--store
    /// etcd`.
    pub fn on_etcd(self) -> bool {
        self.etcd().is_some() || self == Mutation::EtcdStaleReads
    }

    /// The etcd backend's mutation this is, if it is one: it runs only on `--store etcd`.
    pub fn etcd(self) -> Option<EtcdMutation> {
        match self {
            Mutation::EtcdBlindPut => Some(EtcdMutation::BlindPut),
            Mutation::EtcdModRevisionToken => Some(EtcdMutation::ModRevisionToken),
            Mutation::EtcdBeliefFromReply => Some(EtcdMutation::BeliefFromReply),
            Mutation::EtcdTrustWatch => Some(EtcdMutation::TrustWatch),
            Mutation::EtcdIgnoreExpiredKeepAlive => Some(EtcdMutation::IgnoreExpiredKeepAlive),
            _ => None,
        }
    }

    /// The mutation called `name`.
    pub fn from_name(name: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The invariants that may fail first with every checker on: the rule the mutation
    /// breaks. A granting acquire that ignores the holder is seen first either as the old
    /// holder's belief losing its backing or as two believers, depending on which reply
    /// arrives first. A decision made on a stale record and written over the current one can
    /// take a lease from under a believer (BeliefConsistency), write a lower token (the
    /// store-truth half of FencingTokenMonotonic), extend a lease that had expired (the
    /// store-truth half of RenewalRequiresOwnership), or show only in the history
    /// (linearizability; `swarm_dst` shows that check catching it alone). Over 12 seeds:
    /// acquire-ignores-holder 12 LeaseUniqueness (its decision half sees the grant over a
    /// valid holder at once; over 100 seeds from 1, 99, and 1 BeliefConsistency); stale-reads
    /// 9 BeliefConsistency, 3 FencingTokenMonotonic.
    pub fn caught_first_by(self) -> &'static [&'static str] {
        match self {
            // Its decision half sees a grant over another holder at once; a node that
            // re-acquires its own lease and is given a new token is seen by its belief.
            Mutation::AcquireIgnoresHolder => &["LeaseUniqueness", "BeliefConsistency"],
            Mutation::RenewIgnoresOwnership => &["RenewalRequiresOwnership"],
            // A node taking its own expired lease back with the old token looks, in the
            // stored record, like a renewal after expiry.
            Mutation::TokenNotIncreased => &["FencingTokenMonotonic", "RenewalRequiresOwnership"],
            Mutation::ExpiredNotClaimable => &["ExpiredLeaseClaimable"],
            Mutation::BeliefFromReply | Mutation::NoDriftMargin => &["BeliefConsistency"],
            // Only the store-truth halves see these: the decisions were honest.
            Mutation::StoreExtendsExpiredLeases => &["RenewalRequiresOwnership"],
            // A node re-taking a lease it released gets the same token stored: the stored
            // records give the store away, or the node's belief in the token it was told.
            Mutation::StoreKeepsOldToken => &["FencingTokenMonotonic", "BeliefConsistency"],
            Mutation::StaleReads => &[
                "BeliefConsistency",
                "FencingTokenMonotonic",
                "RenewalRequiresOwnership",
                LINEARIZABILITY,
            ],
            // A blind put takes the key from its holder, keeping its create revision: two
            // believers, one of them no longer backed, or a new holder with the old token.
            Mutation::EtcdBlindPut | Mutation::EtcdTrustWatch => &[
                "BeliefConsistency",
                "LeaseUniqueness",
                "FencingTokenMonotonic",
            ],
            // The first renewal hands the holder a token the key does not carry.
            Mutation::EtcdModRevisionToken => &["BeliefConsistency", "FencingTokenMonotonic"],
            Mutation::EtcdBeliefFromReply => &["BeliefConsistency"],
            // A grant on a session etcd already counts as expired: etcd deletes the key when
            // it revokes the session, under the believer.
            Mutation::EtcdIgnoreExpiredKeepAlive => &["BeliefConsistency", "LeaseUniqueness"],
            // The backend guards every write by a compare, so stale reads show only in etcd's
            // history.
            Mutation::EtcdStaleReads => &[LINEARIZABILITY],
        }
    }

    /// The broken decision function, for the four protocol mutations.
    pub fn decide_fn(self) -> Option<DecideFn> {
        match self {
            Mutation::AcquireIgnoresHolder => Some(acquire_ignores_holder),
            Mutation::RenewIgnoresOwnership => Some(renew_ignores_ownership),
            Mutation::TokenNotIncreased => Some(token_not_increased),
            Mutation::ExpiredNotClaimable => Some(expired_not_claimable),
            _ => None,
        }
    }

    /// Breaks `scenario` this way. A broken decision function is applied atomically by the
    /// store, so checking the history against the production protocol would only re-detect
    /// it: linearizability is checked only where it is the check the mutation must meet.
    pub fn apply(self, scenario: &mut LeaseScenario) {
        if let Some(decide) = self.decide_fn() {
            scenario.cluster.decide = decide;
            scenario.check_linearizability = false;
        }
        match self {
            Mutation::BeliefFromReply => scenario.bug_belief_from_reply = true,
            Mutation::NoDriftMargin => scenario.bug_no_drift_margin = true,
            Mutation::StaleReads => scenario.bug_stale_reads = true,
            // The decisions are honest and atomic, so a history checked against them would
            // re-detect the mutation; the store-truth halves are what must catch it.
            Mutation::StoreExtendsExpiredLeases => {
                scenario.cluster.store_write_mutation =
                    Some(StoreWriteMutation::ExtendsExpiredLeases);
                scenario.check_linearizability = false;
            }
            Mutation::StoreKeepsOldToken => {
                scenario.cluster.store_write_mutation = Some(StoreWriteMutation::KeepsOldToken);
                scenario.check_linearizability = false;
            }
            Mutation::EtcdBlindPut
            | Mutation::EtcdModRevisionToken
            | Mutation::EtcdBeliefFromReply
            | Mutation::EtcdTrustWatch
            | Mutation::EtcdIgnoreExpiredKeepAlive => {
                scenario.cluster.store = SwarmStore::Etcd;
                scenario.cluster.etcd_mutation = self.etcd();
                // Atomic and honest at etcd's level: its history would pass.
                scenario.check_linearizability = false;
            }
            Mutation::EtcdStaleReads => {
                scenario.cluster.store = SwarmStore::Etcd;
                scenario.bug_stale_reads = true;
            }
            _ => {}
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
