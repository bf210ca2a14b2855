//! Every checker fed hand-made worlds: each branch that can report a violation is shown
//! rejecting a wrong world, and the nearest correct world is shown accepted, so a checker
//! that stopped looking (or looks at the wrong thing) fails here rather than passing sweeps.

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::{
    backend::decide, backend::Decision, backend::LeaseOp, backend::LeaseRecord,
    backend::LeaseRequest, machine::HeldBelief, LeaseError,
};

use super::{
    ActorMap, ActorView, BeliefConsistency, BeliefView, DecisionRecord, ExpiredLeaseClaimable,
    FencingTokenMonotonic, Invariant, LeaseUniqueness, LeaseWorld, RenewalRequiresOwnership,
};

const DURATION_MS: u64 = 1_000;

fn actor() -> ActorId {
    ActorId::new("a").unwrap()
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn record(holder: Option<&str>, token: u64, acquired_ms: u64, expires_ms: u64) -> LeaseRecord {
    LeaseRecord {
        holder: holder.map(node),
        fencing_token: FencingToken(token),
        acquired_at_ms: acquired_ms,
        expires_at_ms: expires_ms,
        renewal_count: 0,
    }
}

fn belief(holder: &str, token: u64, until_ms: u64) -> BeliefView {
    BeliefView {
        node_id: node(holder),
        held: HeldBelief {
            fencing_token: FencingToken(token),
            until_local_ms: until_ms,
        },
        until_global_ms: until_ms,
    }
}

/// One step's view: the store's records, the decisions made in the step, the beliefs.
#[derive(Default)]
struct Step {
    now_ms: u64,
    record: Option<LeaseRecord>,
    decisions: Vec<DecisionRecord>,
    beliefs: Vec<BeliefView>,
    /// The etcd mode: a lease is held until its key is deleted.
    held_until_deleted: bool,
}

impl Step {
    fn at(now_ms: u64) -> Self {
        Self {
            now_ms,
            ..Self::default()
        }
    }

    fn record(mut self, record: LeaseRecord) -> Self {
        self.record = Some(record);
        self
    }

    /// In the etcd mode, where a lease is held until its key is deleted.
    fn held_until_deleted(mut self) -> Self {
        self.held_until_deleted = true;
        self
    }

    fn belief(mut self, view: BeliefView) -> Self {
        self.beliefs.push(view);
        self
    }

    /// A decision the store made on `before` at this step's time.
    fn decided(mut self, request: LeaseRequest, before: Option<LeaseRecord>, d: Decision) -> Self {
        self.decisions.push(DecisionRecord {
            actor_id: actor(),
            request,
            before,
            store_now_ms: self.now_ms,
            decision: d,
        });
        self
    }

    /// The production decision on `before`, as a correct store makes it.
    fn decided_correctly(self, request: LeaseRequest, before: Option<LeaseRecord>) -> Self {
        let decision = decide(&actor(), before.as_ref(), &request, self.now_ms);
        self.decided(request, before, decision)
    }

    fn check(&self, checker: &mut dyn Invariant) -> Result<(), String> {
        let view = ActorView {
            record: self.record.clone(),
            beliefs: self.beliefs.clone(),
        };
        let actors: ActorMap<ActorView> = [(actor(), view)].into_iter().collect();
        checker.check(&LeaseWorld {
            store_now_ms: self.now_ms,
            actors: &actors,
            changed_indices: &[0],
            decisions: &self.decisions,
            held_until_deleted: self.held_until_deleted,
        })
    }
}

fn request(op: LeaseOp, holder: &str, token: Option<u64>) -> LeaseRequest {
    let mut request = LeaseRequest::new(op, node(holder), DURATION_MS);
    request.fencing_token = token.map(FencingToken);
    request
}

/// A decision that writes `record` and replies with its lease.
fn granting(record: LeaseRecord) -> Decision {
    let reply = record
        .lease(&actor())
        .expect("a granted record names its holder");
    Decision {
        write: Some(record),
        reply: Ok(reply),
    }
}

fn rejects(result: Result<(), String>, says: &str) {
    let message = result.expect_err("the checker accepted a wrong world");
    assert!(message.contains(says), "{message:?} does not say {says:?}");
}

#[test]
fn lease_uniqueness_rejects_two_believers_only() {
    let both = Step::at(100)
        .record(record(Some("n1"), 1, 0, 1_000))
        .belief(belief("n1", 1, 900))
        .belief(belief("n2", 2, 950));
    rejects(both.check(&mut LeaseUniqueness), "both believe");
    // One of them already stopped believing: fine.
    let ended = Step::at(100)
        .belief(belief("n1", 1, 900))
        .belief(belief("n2", 2, 100));
    assert_eq!(ended.check(&mut LeaseUniqueness), Ok(()));
    // The same node twice (an old and a renewed view): fine.
    let same = Step::at(100)
        .belief(belief("n1", 1, 900))
        .belief(belief("n1", 1, 950));
    assert_eq!(same.check(&mut LeaseUniqueness), Ok(()));
}

/// The store's side: an acquire granted to n2 one millisecond before n1's lease expires,
/// when n1's belief (shortened by its margin) has already ended, leaves no two believers,
/// yet the store broke its promise to n1. At the expiry instant, or to n1 itself, it is fine.
#[test]
fn lease_uniqueness_rejects_a_grant_over_another_valid_holder() {
    let valid = record(Some("n1"), 1, 0, 1_000);
    let early = Step::at(999)
        .record(record(Some("n2"), 2, 999, 1_999))
        .belief(belief("n1", 1, 990))
        .belief(belief("n2", 2, 1_990))
        .decided(
            request(LeaseOp::Acquire, "n2", None),
            Some(valid.clone()),
            granting(record(Some("n2"), 2, 999, 1_999)),
        );
    rejects(
        early.check(&mut LeaseUniqueness),
        "acquire of a by n2 granted at store time 999 ms while n1 held it until 1000 ms",
    );
    let on_time = Step::at(1_000)
        .decided_correctly(request(LeaseOp::Acquire, "n2", None), Some(valid.clone()));
    assert!(on_time.decisions[0].decision.reply.is_ok());
    assert_eq!(on_time.check(&mut LeaseUniqueness), Ok(()));
    let own = Step::at(500).decided_correctly(request(LeaseOp::Acquire, "n1", None), Some(valid));
    assert!(own.decisions[0].decision.reply.is_ok());
    assert_eq!(own.check(&mut LeaseUniqueness), Ok(()));
}

#[test]
fn belief_consistency_rejects_every_unbacked_belief() {
    let backed = record(Some("n1"), 3, 0, 1_000);
    let ok = Step::at(100)
        .record(backed.clone())
        .belief(belief("n1", 3, 990));
    assert_eq!(ok.check(&mut BeliefConsistency), Ok(()));
    let cases = [
        ("no record", Step::at(100).belief(belief("n1", 3, 990))),
        (
            "another holder",
            Step::at(100)
                .record(record(Some("n2"), 4, 50, 1_050))
                .belief(belief("n1", 3, 990)),
        ),
        (
            "released",
            Step::at(100)
                .record(record(None, 3, 0, 1_000))
                .belief(belief("n1", 3, 990)),
        ),
        (
            "another token",
            Step::at(100)
                .record(record(Some("n1"), 4, 0, 1_000))
                .belief(belief("n1", 3, 990)),
        ),
        (
            "belief outlives the lease",
            Step::at(100).record(backed).belief(belief("n1", 3, 1_001)),
        ),
    ];
    for (why, step) in cases {
        let result = step.check(&mut BeliefConsistency);
        assert!(result.is_err(), "{why}: accepted");
        rejects(result, "believes it holds");
    }
}

#[test]
fn renewal_requires_ownership_rejects_grants_to_non_owners() {
    let held = record(Some("n1"), 1, 0, 1_000);
    let renewed = record(Some("n1"), 1, 0, 1_500);
    let ok = Step::at(500)
        .record(renewed.clone())
        .decided_correctly(request(LeaseOp::Renew, "n1", Some(1)), Some(held.clone()));
    assert_eq!(ok.check(&mut RenewalRequiresOwnership::default()), Ok(()));
    let cases = [
        ("renewed by another node", "n2", Some(held.clone()), 500),
        ("renewed after expiry", "n1", Some(held.clone()), 1_000),
        ("renewed with no record", "n1", None, 500),
        (
            "renewed a released lease",
            "n1",
            Some(record(None, 1, 0, 1_000)),
            500,
        ),
    ];
    for (why, by, before, at_ms) in cases {
        let step = Step::at(at_ms).record(renewed.clone()).decided(
            request(LeaseOp::Renew, by, Some(1)),
            before,
            granting(record(Some(by), 1, 0, at_ms + DURATION_MS)),
        );
        let result = step.check(&mut RenewalRequiresOwnership::default());
        assert!(result.is_err(), "{why}: accepted");
        rejects(result, "granted at store time");
    }
    // A grant whose token is not the one the holder had.
    let other_token = Step::at(500).record(renewed).decided(
        request(LeaseOp::Renew, "n1", Some(1)),
        Some(held),
        granting(record(Some("n1"), 2, 0, 1_500)),
    );
    rejects(
        other_token.check(&mut RenewalRequiresOwnership::default()),
        "granted at store time",
    );
}

/// The store-truth half: a store that extends an expired lease without any decision saying
/// so (it wrote something other than what `decide` returned) is caught from the records.
#[test]
fn renewal_requires_ownership_rejects_a_store_that_extends_an_expired_lease() {
    let mut checker = RenewalRequiresOwnership::default();
    let first = Step::at(0).record(record(Some("n1"), 1, 0, 1_000));
    assert_eq!(first.check(&mut checker), Ok(()));
    // Extended while still valid: a renewal, fine.
    let renewed = Step::at(900).record(record(Some("n1"), 1, 0, 1_900));
    assert_eq!(renewed.check(&mut checker), Ok(()));
    // Extended after it expired, with no decision in sight: the store wrote it on its own.
    let late = Step::at(2_000).record(record(Some("n1"), 1, 0, 3_000));
    rejects(late.check(&mut checker), "extended after it expired");
}

/// In the etcd mode a key outlives its record's expiry until etcd deletes it, so the
/// store-truth half is off there: the same late extension is accepted. The decision half is
/// not: a renewal granted to a non-owner is still rejected.
#[test]
fn renewal_requires_ownership_in_the_etcd_mode_judges_decisions_not_stored_expiries() {
    let mut checker = RenewalRequiresOwnership::default();
    let first = Step::at(0)
        .held_until_deleted()
        .record(record(Some("n1"), 1, 0, 1_000));
    assert_eq!(first.check(&mut checker), Ok(()));
    let late = Step::at(2_000)
        .held_until_deleted()
        .record(record(Some("n1"), 1, 0, 3_000));
    assert_eq!(late.check(&mut checker), Ok(()));

    let held = record(Some("n1"), 1, 0, 1_000);
    let by_another = Step::at(500).held_until_deleted().decided(
        request(LeaseOp::Renew, "n2", Some(1)),
        Some(held),
        granting(record(Some("n2"), 1, 0, 1_500)),
    );
    rejects(
        by_another.check(&mut RenewalRequiresOwnership::default()),
        "granted at store time",
    );
}

#[test]
fn expired_lease_claimable_rejects_a_refused_free_or_expired_lease() {
    let expired = record(Some("n1"), 1, 0, 1_000);
    let granted = Step::at(1_000)
        .decided_correctly(request(LeaseOp::Acquire, "n2", None), Some(expired.clone()));
    assert_eq!(granted.check(&mut ExpiredLeaseClaimable), Ok(()));
    let refusal = Decision {
        write: None,
        reply: Err(LeaseError::HeldByOther {
            actor_id: actor(),
            holder: node("n1"),
            expires_at_ms: 1_000,
        }),
    };
    for (why, before) in [
        ("expired", Some(expired.clone())),
        ("never leased", None),
        ("released", Some(record(None, 1, 0, 1_000))),
    ] {
        let step = Step::at(1_000).decided(
            request(LeaseOp::Acquire, "n2", None),
            before,
            refusal.clone(),
        );
        let result = step.check(&mut ExpiredLeaseClaimable);
        assert!(result.is_err(), "{why}: accepted");
        rejects(result, "was not granted");
    }
    // Granted, but to someone else.
    let misdirected = Step::at(1_000).decided(
        request(LeaseOp::Acquire, "n2", None),
        Some(expired),
        granting(record(Some("n3"), 2, 1_000, 2_000)),
    );
    rejects(
        misdirected.check(&mut ExpiredLeaseClaimable),
        "was not granted",
    );
    // Refusing a lease that is still valid is right.
    let valid = Step::at(500).decided_correctly(
        request(LeaseOp::Acquire, "n2", None),
        Some(record(Some("n1"), 1, 0, 1_000)),
    );
    assert_eq!(valid.check(&mut ExpiredLeaseClaimable), Ok(()));
}

/// The etcd mode changes nothing for acquires: a refused expired lease is still rejected.
#[test]
fn expired_lease_claimable_in_the_etcd_mode_rejects_a_refused_expired_lease() {
    let expired = record(Some("n1"), 1, 0, 1_000);
    let granted = Step::at(1_000)
        .held_until_deleted()
        .decided_correctly(request(LeaseOp::Acquire, "n2", None), Some(expired.clone()));
    assert_eq!(granted.check(&mut ExpiredLeaseClaimable), Ok(()));
    let refused = Step::at(1_000).held_until_deleted().decided(
        request(LeaseOp::Acquire, "n2", None),
        Some(expired),
        Decision {
            write: None,
            reply: Err(LeaseError::HeldByOther {
                actor_id: actor(),
                holder: node("n1"),
                expires_at_ms: 1_000,
            }),
        },
    );
    rejects(refused.check(&mut ExpiredLeaseClaimable), "was not granted");
}

#[test]
fn fencing_token_monotonic_rejects_decisions_that_lower_or_reuse_a_token() {
    let expired = record(Some("n1"), 5, 0, 1_000);
    let ok = Step::at(1_000)
        .decided_correctly(request(LeaseOp::Acquire, "n2", None), Some(expired.clone()));
    assert_eq!(ok.check(&mut FencingTokenMonotonic::default()), Ok(()));
    let lowered = Step::at(1_000).decided(
        request(LeaseOp::Acquire, "n2", None),
        Some(expired.clone()),
        granting(record(Some("n2"), 4, 1_000, 2_000)),
    );
    rejects(
        lowered.check(&mut FencingTokenMonotonic::default()),
        "wrote token 4 over token 5",
    );
    let reused = Step::at(1_000).decided(
        request(LeaseOp::Acquire, "n2", None),
        Some(expired),
        granting(record(Some("n2"), 5, 1_000, 2_000)),
    );
    rejects(
        reused.check(&mut FencingTokenMonotonic::default()),
        "wrote token 5 over token 5",
    );
}

/// The holder itself lowering its token (a renew or a release that writes a lower one): no
/// new holder, so only the "lower than before" half can catch it.
#[test]
fn fencing_token_monotonic_rejects_a_holder_that_lowers_its_own_token() {
    let held = record(Some("n1"), 5, 0, 1_000);
    let renewed =
        Step::at(500).decided_correctly(request(LeaseOp::Renew, "n1", Some(5)), Some(held.clone()));
    assert_eq!(renewed.check(&mut FencingTokenMonotonic::default()), Ok(()));
    let renew_lowered = Step::at(500).decided(
        request(LeaseOp::Renew, "n1", Some(5)),
        Some(held.clone()),
        granting(record(Some("n1"), 4, 0, 1_500)),
    );
    rejects(
        renew_lowered.check(&mut FencingTokenMonotonic::default()),
        "renew on a by n1 wrote token 4 over token 5",
    );
    let release_lowered = Step::at(500).decided(
        request(LeaseOp::Release, "n1", Some(5)),
        Some(held.clone()),
        Decision {
            write: Some(record(None, 4, 0, 1_000)),
            reply: Ok(held.lease(&actor()).expect("held")),
        },
    );
    rejects(
        release_lowered.check(&mut FencingTokenMonotonic::default()),
        "release on a by n1 wrote token 4 over token 5",
    );
}

/// The store-truth half: records that go back, or change holder under one token, without a
/// decision that wrote them (a store writing something other than what `decide` returned).
#[test]
fn fencing_token_monotonic_rejects_stored_records_that_go_back() {
    let mut checker = FencingTokenMonotonic::default();
    let first = Step::at(0).record(record(Some("n1"), 3, 0, 1_000));
    assert_eq!(first.check(&mut checker), Ok(()));
    let renewed = Step::at(500).record(record(Some("n1"), 3, 0, 1_500));
    assert_eq!(renewed.check(&mut checker), Ok(()));
    let released = Step::at(600).record(record(None, 3, 0, 1_500));
    assert_eq!(released.check(&mut checker), Ok(()));
    let went_back = Step::at(700).record(record(Some("n2"), 2, 700, 1_700));
    rejects(went_back.check(&mut checker), "went back from 3 to 2");

    let mut checker = FencingTokenMonotonic::default();
    let first = Step::at(0).record(record(Some("n1"), 3, 0, 1_000));
    assert_eq!(first.check(&mut checker), Ok(()));
    let same_token = Step::at(1_200).record(record(Some("n2"), 3, 1_200, 2_200));
    rejects(same_token.check(&mut checker), "with the same token");
}

/// The store-truth half: a holder that takes its own released lease back with the token it
/// had (a store keeping the old token) is a new holder like any other.
#[test]
fn fencing_token_monotonic_rejects_a_holder_retaking_its_released_lease_with_its_token() {
    let steps = |retaken_token: u64| {
        let mut checker = FencingTokenMonotonic::default();
        let held = Step::at(0).record(record(Some("n1"), 3, 0, 1_000));
        assert_eq!(held.check(&mut checker), Ok(()));
        let released = Step::at(600).record(record(None, 3, 0, 600));
        assert_eq!(released.check(&mut checker), Ok(()));
        let retaken = Step::at(700).record(record(Some("n1"), retaken_token, 700, 1_700));
        retaken.check(&mut checker)
    };
    assert_eq!(steps(4), Ok(()));
    rejects(
        steps(3),
        "passed from None to Some(\"n1\") with the same token 3",
    );
}

/// The decision half: a grant that writes one token and replies with another (or names
/// another holder in its reply) hands its holder a token the store does not hold.
#[test]
fn fencing_token_monotonic_rejects_a_grant_whose_reply_is_not_what_it_wrote() {
    let expired = record(Some("n1"), 5, 0, 1_000);
    let written = record(Some("n2"), 6, 1_000, 2_000);
    let replying = |reply: LeaseRecord| {
        Step::at(1_000).decided(
            request(LeaseOp::Acquire, "n2", None),
            Some(expired.clone()),
            Decision {
                write: Some(written.clone()),
                reply: Ok(reply.lease(&actor()).expect("a holder")),
            },
        )
    };
    let ok = replying(written.clone());
    assert_eq!(ok.check(&mut FencingTokenMonotonic::default()), Ok(()));
    for token in [5, 4, 7] {
        let other = replying(record(Some("n2"), token, 1_000, 2_000));
        rejects(
            other.check(&mut FencingTokenMonotonic::default()),
            "wrote token 6",
        );
    }
    let other_holder = replying(record(Some("n3"), 6, 1_000, 2_000));
    rejects(
        other_holder.check(&mut FencingTokenMonotonic::default()),
        "but replied",
    );
    let held = record(Some("n1"), 5, 0, 1_000);
    let renewal = Step::at(500).decided(
        request(LeaseOp::Renew, "n1", Some(5)),
        Some(held),
        Decision {
            write: Some(record(Some("n1"), 5, 0, 1_500)),
            reply: Ok(record(Some("n1"), 4, 0, 1_500).lease(&actor()).unwrap()),
        },
    );
    rejects(
        renewal.check(&mut FencingTokenMonotonic::default()),
        "renew on a by n1 wrote token 5",
    );
}

/// A renewal carrying the token of an earlier tenure of the same holder id is refused by
/// the store; one granted anyway extended a lease the requester no longer held.
#[test]
fn renewal_requires_ownership_rejects_a_renewal_with_an_earlier_tenures_token() {
    let held = record(Some("n1"), 2, 400, 1_400);
    for token in [Some(2), None] {
        let ok = Step::at(500)
            .decided_correctly(request(LeaseOp::Renew, "n1", token), Some(held.clone()));
        assert!(
            ok.decisions[0].decision.reply.is_ok(),
            "{token:?} is renewed"
        );
        assert_eq!(ok.check(&mut RenewalRequiresOwnership::default()), Ok(()));
    }
    let stale = request(LeaseOp::Renew, "n1", Some(1));
    assert!(decide(&actor(), Some(&held), &stale, 500).reply.is_err());
    let granted = Step::at(500).decided(
        stale,
        Some(held),
        granting(record(Some("n1"), 2, 400, 1_500)),
    );
    rejects(
        granted.check(&mut RenewalRequiresOwnership::default()),
        "renewal of a by n1 granted",
    );
}

/// An acquire of an expired lease answered "granted" without writing the grant leaves the
/// lease with its old holder: it was not claimed. (etcd's decisions, read off its
/// transactions, carry no write, and are judged by their replies.)
#[test]
fn expired_lease_claimable_rejects_a_grant_that_writes_nothing() {
    let expired = record(Some("n1"), 1, 0, 1_000);
    let ok = Step::at(1_000)
        .decided_correctly(request(LeaseOp::Acquire, "n2", None), Some(expired.clone()));
    assert_eq!(ok.check(&mut ExpiredLeaseClaimable), Ok(()));
    let reply_only = Decision {
        write: None,
        reply: Ok(record(Some("n2"), 2, 1_000, 2_000).lease(&actor()).unwrap()),
    };
    let unwritten = Step::at(1_000).decided(
        request(LeaseOp::Acquire, "n2", None),
        Some(expired.clone()),
        reply_only.clone(),
    );
    rejects(
        unwritten.check(&mut ExpiredLeaseClaimable),
        "was not granted",
    );
    let in_etcd = Step::at(1_000).held_until_deleted().decided(
        request(LeaseOp::Acquire, "n2", None),
        Some(expired.clone()),
        reply_only,
    );
    assert_eq!(in_etcd.check(&mut ExpiredLeaseClaimable), Ok(()));
    let written_to_another = Step::at(1_000).decided(
        request(LeaseOp::Acquire, "n2", None),
        Some(expired),
        Decision {
            write: Some(record(Some("n3"), 2, 1_000, 2_000)),
            reply: Ok(record(Some("n2"), 2, 1_000, 2_000).lease(&actor()).unwrap()),
        },
    );
    rejects(
        written_to_another.check(&mut ExpiredLeaseClaimable),
        "was not granted",
    );
}
