//! Hand-built histories, each accepted or rejected for the reason its test states, and
//! randomized histories of a correct store, all accepted.

use super::*;
use kelpie_core::{FencingToken, NodeId};
use kelpie_lease::{
    backend::decide, backend::LeaseOp, backend::LeaseRecord, backend::LeaseRequest, Lease,
    LeaseError, StoreError,
};
use kelpie_sim::DeterministicRng;

use crate::history::OpOutcome;

const LEASE_MS: u64 = 1_000;

fn actor() -> ActorId {
    ActorId::new("a").unwrap()
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn request(node_name: &str, op: LeaseOp, token: Option<u64>) -> LeaseRequest {
    let mut request = LeaseRequest::new(op, node(node_name), LEASE_MS);
    request.fencing_token = token.map(FencingToken);
    request
}

fn lease(holder: &str, token: u64, acquired_ms: u64, expires_ms: u64, renewals: u64) -> Lease {
    Lease {
        actor_id: actor(),
        holder: node(holder),
        fencing_token: FencingToken(token),
        acquired_at_ms: acquired_ms,
        expires_at_ms: expires_ms,
        renewal_count: renewals,
    }
}

fn held_by(holder: &str, expires_at_ms: u64) -> Result<Lease, LeaseError> {
    Err(LeaseError::HeldByOther {
        actor_id: actor(),
        holder: node(holder),
        expires_at_ms,
    })
}

fn not_holder(node_name: &str, holder: Option<&str>) -> Result<Lease, LeaseError> {
    Err(LeaseError::NotHolder {
        actor_id: actor(),
        node_id: node(node_name),
        holder: holder.map(node),
    })
}

/// A hand-built history: each operation with the reply the node saw, or none.
#[derive(Default)]
struct Hand {
    ops: Vec<HistoryOp>,
}

/// A hand-written history that starts with n1's acquire, answered at 2 ms with token 1 until
/// 1001: the opening most of these histories share.
fn n1_acquired() -> Hand {
    Hand::default().answered(
        request("n1", LeaseOp::Acquire, None),
        (0, 2),
        Ok(lease("n1", 1, 1, 1_001, 0)),
    )
}

impl Hand {
    fn answered(
        mut self,
        request: LeaseRequest,
        (invoked_ms, responded_ms): (u64, u64),
        reply: Result<Lease, LeaseError>,
    ) -> Self {
        self.ops.push(HistoryOp {
            actor_id: actor(),
            request,
            invoked_ms,
            outcome: OpOutcome::Returned {
                responded_ms,
                reply,
            },
        });
        self
    }

    /// A request whose reply never came: the node timed out 200 ms later.
    fn unanswered(mut self, request: LeaseRequest, invoked_ms: u64) -> Self {
        self.ops.push(HistoryOp {
            actor_id: actor(),
            request,
            invoked_ms,
            outcome: OpOutcome::Failed {
                responded_ms: invoked_ms + 200,
                error: StoreError::CommitUnknown {
                    reason: "no reply".into(),
                },
            },
        });
        self
    }

    fn check(
        &self,
        delivery: impl Into<Delivery>,
    ) -> Result<LinearizabilityReport, LinearizabilityError> {
        check_history(&self.ops, delivery)
    }

    /// Accepted whether or not the network could duplicate.
    fn accepted(&self) {
        for duplicates in [Duplicates::Impossible, Duplicates::Possible] {
            if let Err(error) = self.check(duplicates) {
                panic!("rejected with {duplicates:?}: {error}");
            }
        }
    }

    /// Rejected with `duplicates`; returns the window, checking that no linearization gets
    /// past the operation with index `stuck_at`.
    fn rejected(&self, delivery: impl Into<Delivery>, stuck_at: usize) -> OffendingWindow {
        let delivery = delivery.into();
        let error = match self.check(delivery) {
            Ok(report) => panic!("accepted with {delivery:?}: {report:?}"),
            Err(error) => error,
        };
        let LinearizabilityError::NotLinearizable { actor_id, window } = error else {
            panic!("expected a violation, got {error}");
        };
        assert_eq!(actor_id, actor());
        let stuck = window.stuck_at.clone().unwrap_or_default();
        assert!(
            stuck.starts_with(&format!("#{stuck_at} ")),
            "stuck at {stuck:?}, expected #{stuck_at}: {window}"
        );
        window
    }

    /// Rejected whether or not the network could duplicate.
    fn rejected_always(&self, stuck_at: usize) -> OffendingWindow {
        self.rejected(Duplicates::Possible, stuck_at);
        self.rejected(Duplicates::Impossible, stuck_at)
    }
}

/// n1 holds token 1 until 1001; n3's refusal, answered at 900, names n2 as the holder; n2 got
/// token 2 at 201. The history of issue 13, without its unanswered release.
fn two_holders() -> Hand {
    n1_acquired()
        .answered(
            request("n3", LeaseOp::Acquire, None),
            (100, 900),
            held_by("n2", 1_201),
        )
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (200, 202),
            Ok(lease("n2", 2, 201, 1_201, 0)),
        )
}

/// Rejected: n2's grant at 201 needs n1's lease (valid until 1001) gone, and the only thing
/// that could end it, n1's release, was sent at 500, after the grant was answered (202). An
/// effect nobody saw cannot take effect before it was sent, nor before a reply that came
/// before it; so n1 and n2 would both hold the actor from 201 ms.
#[test]
fn issue_13_an_unanswered_release_cannot_explain_an_earlier_grant() {
    let hand = two_holders().unanswered(request("n1", LeaseOp::Release, Some(1)), 500);
    let window = hand.rejected_always(2);
    assert_eq!(window.to_ms, 202, "failing since n2's grant: {window}");
    assert!(window.to_string().contains("n2 acquire"), "{window}");
}

/// Rejected: the same history without the unanswered release; nothing ends n1's lease.
#[test]
fn two_concurrent_holders_are_rejected() {
    two_holders().rejected_always(2);
}

/// Accepted: the same grant, answered after the release was sent: the release took effect in
/// [500, 501], then n2 got token 2 at 501 and n3, answered at 900, saw n2 hold it.
#[test]
fn an_unanswered_release_explains_a_later_grant() {
    n1_acquired()
        .answered(
            request("n3", LeaseOp::Acquire, None),
            (100, 900),
            held_by("n2", 1_501),
        )
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (500, 502),
            Ok(lease("n2", 2, 501, 1_501, 0)),
        )
        .unanswered(request("n1", LeaseOp::Release, Some(1)), 500)
        .accepted();
}

/// Accepted: an unanswered release explains a later refusal: n1's own renewal finds no holder.
/// Rejected: the same refusal answered before the release was sent.
#[test]
fn an_unanswered_release_explains_a_later_refusal_but_not_an_earlier_one() {
    let before = |renew_ms: u64| {
        n1_acquired()
            .unanswered(request("n1", LeaseOp::Release, Some(1)), 100)
            .answered(
                request("n1", LeaseOp::Renew, Some(1)),
                (renew_ms, renew_ms + 2),
                not_holder("n1", None),
            )
    };
    before(300).accepted();
    before(50).rejected_always(2);
}

/// Accepted: an acquire whose reply was lost took effect at 50 (its expiry, 1050, says when),
/// which explains n2's refusal naming n1; n3 is refused until 1050 and gets token 2 after.
/// Rejected: a refusal naming an expiry of 900, which no acquire sent at 0 can give (it would
/// have taken effect before it was sent).
#[test]
fn an_unanswered_acquire_explains_a_later_held_by_refusal() {
    let history = |expires_ms: u64| {
        Hand::default()
            .unanswered(request("n1", LeaseOp::Acquire, None), 0)
            .answered(
                request("n2", LeaseOp::Acquire, None),
                (100, 102),
                held_by("n1", expires_ms),
            )
    };
    history(1_050)
        .answered(
            request("n3", LeaseOp::Acquire, None),
            (1_040, 1_045),
            held_by("n1", 1_050),
        )
        .answered(
            request("n3", LeaseOp::Acquire, None),
            (1_060, 1_062),
            Ok(lease("n3", 2, 1_061, 2_061, 0)),
        )
        .accepted();
    history(900).rejected_always(1);
}

/// Accepted only where the network can duplicate: n1's acquire, answered at 2 and released at
/// 11, reaches the store a second time at 1500 and grants n1 token 2 until 2500, which n2's
/// refusal names. Without duplication nothing can have granted n1 the lease again.
#[test]
fn a_duplicate_is_possible_only_where_the_network_duplicates() {
    let hand = n1_acquired()
        .answered(
            request("n1", LeaseOp::Release, Some(1)),
            (10, 12),
            Ok(lease("n1", 1, 1, 1_001, 0)),
        )
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (2_000, 2_002),
            held_by("n1", 2_500),
        );
    hand.check(Duplicates::Possible).unwrap();
    hand.rejected(Duplicates::Impossible, 2);
}

/// Delivery with a bound on how late a request takes effect, and no duplicates.
fn within(effect_within_ms: u64) -> Delivery {
    Delivery {
        duplicates: Duplicates::Impossible,
        effect_within_ms: Some(effect_within_ms),
    }
}

/// n2's refusal names n3 as holder until 2300: n3's acquire, sent at 100 and never answered,
/// took effect at 1300 (after n1's lease ran out at 1001). Accepted where a request may take
/// effect any time later, or within 1200 ms; rejected where it must within 500 ms: its window
/// [100, 600] closes while n1 still holds the lease, so nothing can have granted n3 the lease.
#[test]
fn an_unseen_effect_takes_place_within_the_delivery_bound_or_not_at_all() {
    let hand = n1_acquired()
        .unanswered(request("n3", LeaseOp::Acquire, None), 100)
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (1_500, 1_510),
            held_by("n3", 2_300),
        );
    hand.accepted();
    hand.check(within(1_200)).unwrap();
    hand.rejected(within(500), 2);
    hand.rejected(within(1_199), 2);
}

/// Two unseen acquires by n3 (sent at 100 and at 1000) and a bound of 500 ms: the first one's
/// window [100, 600] has closed when the lease frees at 1001, so the grant at 1300 that n2's
/// refusal names can only be the second one's, which the search must reach past the first.
/// With both sent early (100 and 200), nothing can have granted it.
#[test]
fn a_later_unseen_effect_serves_where_an_earlier_ones_window_closed() {
    let history = |second_ms: u64| {
        n1_acquired()
            .unanswered(request("n3", LeaseOp::Acquire, None), 100)
            .unanswered(request("n3", LeaseOp::Acquire, None), second_ms)
            .answered(
                request("n2", LeaseOp::Acquire, None),
                (1_500, 1_510),
                held_by("n3", 2_300),
            )
    };
    history(1_000).check(within(500)).unwrap();
    history(200).rejected(within(500), 3);
    history(200).accepted();
}

/// Rejected: a release answered at 50 returns a lease granted by an acquire invoked at 100: the
/// release completed before the acquire began, so it must come first in the order.
#[test]
fn an_operation_cannot_see_one_invoked_after_it_completed() {
    Hand::default()
        .answered(
            request("n1", LeaseOp::Release, Some(1)),
            (0, 50),
            Ok(lease("n1", 1, 105, 1_105, 0)),
        )
        .answered(
            request("n1", LeaseOp::Acquire, None),
            (100, 110),
            Ok(lease("n1", 1, 105, 1_105, 0)),
        )
        .rejected_always(0);
}

/// Rejected: two renewals one after the other in real time both report one renewal; the second
/// must see the first. Accepted: when they overlap, the one invoked later may go first.
#[test]
fn renewals_follow_real_time_order() {
    let renewals = |first: (u64, u64), first_reply: Lease| {
        n1_acquired()
            .answered(
                request("n1", LeaseOp::Renew, Some(1)),
                first,
                Ok(first_reply),
            )
            .answered(
                request("n1", LeaseOp::Renew, Some(1)),
                (200, 202),
                Ok(lease("n1", 1, 1, 1_201, 1)),
            )
    };
    renewals((100, 102), lease("n1", 1, 1, 1_101, 1)).rejected_always(2);
    renewals((100, 300), lease("n1", 1, 1, 1_250, 2)).accepted();
}

/// Rejected: a renewal sent at 500 cannot have extended the lease to 1400 (it takes effect at
/// 500 at the earliest, so to 1500 at least). Accepted: the expiry 1510 it gives at 510. Where
/// the network duplicates, 1400 is accepted too, for another reason: n1's acquire reached the
/// store a second time at 400 and refreshed the lease to 1400.
#[test]
fn an_unseen_renewal_cannot_take_effect_before_it_was_sent() {
    let history = |expires_ms: u64| {
        n1_acquired()
            .unanswered(request("n1", LeaseOp::Renew, Some(1)), 500)
            .answered(
                request("n2", LeaseOp::Acquire, None),
                (1_050, 1_052),
                held_by("n1", expires_ms),
            )
    };
    history(1_510).accepted();
    history(1_400).rejected(Duplicates::Impossible, 2);
    history(1_400).check(Duplicates::Possible).unwrap();
    // Before 1001 nothing can explain it: the lease never expires earlier than granted.
    history(990).rejected_always(2);
}

/// Accepted: an unseen renewal took effect at 120, before n3's refused release (at 130 or
/// later), which does not see it; n2's refusal later names the expiry it gave (1120). A search
/// that only placed unseen effects after the answered operations already placed (at 130 or
/// later) would find no linearization: this is the false alarm of clamping. The restricted
/// first search misses it too (nothing fails to fit where the renewal must go); the
/// exhaustive second search finds it.
#[test]
fn an_unseen_effect_goes_before_an_answered_operation_that_does_not_see_it() {
    n1_acquired()
        .unanswered(request("n1", LeaseOp::Renew, Some(1)), 100)
        .answered(
            request("n3", LeaseOp::Release, Some(1)),
            (130, 150),
            not_holder("n3", Some("n1")),
        )
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (1_050, 1_060),
            held_by("n1", 1_120),
        )
        .accepted();
}

/// Accepted: a chain of unseen effects, a grant then a renewal, explains one refusal.
#[test]
fn a_chain_of_unseen_effects_explains_a_refusal() {
    Hand::default()
        .unanswered(request("n1", LeaseOp::Acquire, None), 0)
        .unanswered(request("n1", LeaseOp::Renew, Some(1)), 300)
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (500, 502),
            held_by("n1", 1_350),
        )
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (1_400, 1_402),
            Ok(lease("n2", 2, 1_401, 2_401, 0)),
        )
        .accepted();
}

/// Rejected: tokens never go down. n3's grant repeats token 2 after n2's tenure; the token cap
/// prunes every state past n2's grant.
#[test]
fn a_repeated_token_is_rejected() {
    n1_acquired()
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (2_000, 2_002),
            Ok(lease("n2", 2, 2_001, 3_001, 0)),
        )
        .answered(
            request("n3", LeaseOp::Acquire, None),
            (4_000, 4_002),
            Ok(lease("n3", 2, 4_001, 5_001, 0)),
        )
        .rejected_always(2);
}

/// Rejected: n2's token repeats n1's, even with an unanswered release that might explain a
/// hand-over (a new holder always takes a new token).
#[test]
fn two_holders_with_one_token_are_rejected() {
    n1_acquired()
        .unanswered(request("n1", LeaseOp::Release, Some(1)), 5)
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (10, 12),
            Ok(lease("n2", 1, 11, 1_011, 0)),
        )
        .rejected_always(2);
}

/// Rejected: effects that cannot change the record explain nothing. An unanswered renewal by a
/// node that does not hold the lease, and an unanswered release with a token that has passed
/// (n1's first tenure), cannot end n1's second tenure.
#[test]
fn unanswered_requests_that_cannot_write_explain_nothing() {
    n1_acquired()
        .answered(
            request("n1", LeaseOp::Release, Some(1)),
            (10, 12),
            Ok(lease("n1", 1, 1, 1_001, 0)),
        )
        .answered(
            request("n1", LeaseOp::Acquire, None),
            (20, 22),
            Ok(lease("n1", 2, 21, 1_021, 0)),
        )
        .unanswered(request("n2", LeaseOp::Renew, Some(2)), 30)
        .unanswered(request("n1", LeaseOp::Release, Some(1)), 40)
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (100, 102),
            Ok(lease("n2", 3, 101, 1_101, 0)),
        )
        .rejected_always(5);
}

/// Rejected: replies `decide` could never give for this request: a refusal naming no holder,
/// and one about another node.
#[test]
fn replies_the_store_cannot_give_are_rejected() {
    let granted = || {
        Hand::default().answered(
            request("n1", LeaseOp::Acquire, None),
            (0, 2),
            Ok(lease("n1", 1, 1, 1_001, 0)),
        )
    };
    granted()
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (10, 12),
            held_by("n9", 1_001),
        )
        .rejected_always(1);
    granted()
        .answered(
            request("n2", LeaseOp::Renew, Some(1)),
            (10, 12),
            not_holder("n3", Some("n1")),
        )
        .rejected_always(1);
}

/// Rejected: a reply that is right in every part but names another actor is one the store
/// cannot give for this one (`Seen::Impossible`). Each history is accepted with this actor.
#[test]
fn a_reply_about_another_actor_is_rejected() {
    let other = ActorId::new("b").unwrap();
    let grant = |actor_id: ActorId| {
        Hand::default().answered(
            request("n1", LeaseOp::Acquire, None),
            (0, 2),
            Ok(Lease {
                actor_id,
                ..lease("n1", 1, 1, 1_001, 0)
            }),
        )
    };
    grant(actor()).accepted();
    grant(other.clone()).rejected_always(0);

    let refusal = |actor_id: ActorId| {
        grant(actor()).answered(
            request("n2", LeaseOp::Acquire, None),
            (10, 12),
            Err(LeaseError::HeldByOther {
                actor_id,
                holder: node("n1"),
                expires_at_ms: 1_001,
            }),
        )
    };
    refusal(actor()).accepted();
    refusal(other).rejected_always(1);
}

/// Rejected: an expired-lease refusal of n1's renewal that names n2, though it is right in
/// every other part (accepted naming n1).
#[test]
fn an_expired_refusal_naming_another_node_is_rejected() {
    expired_renewal("n1", 1_001).accepted();
    expired_renewal("n2", 1_001).rejected_always(1);
}

/// n1 acquires (expiry 1001), then its renewal at 1100 is refused as expired, the refusal
/// naming `node_name` and `expired_at_ms`.
fn expired_renewal(node_name: &str, expired_at_ms: u64) -> Hand {
    n1_acquired().answered(
        request("n1", LeaseOp::Renew, Some(1)),
        (1_100, 1_102),
        Err(LeaseError::Expired {
            actor_id: actor(),
            node_id: node(node_name),
            expired_at_ms,
        }),
    )
}

/// Rejected: an expired-lease refusal naming an expiry other than the record's (1001).
/// Where the network duplicates, a second delivery of the acquire at 50 refreshes the expiry
/// to 1050, so 1050 is accepted then; 900 never is (expiries only grow within a tenure).
#[test]
fn an_expiry_the_record_does_not_have_is_rejected() {
    let history = |expired_at_ms: u64| expired_renewal("n1", expired_at_ms);
    history(1_001).accepted();
    history(1_050).rejected(Duplicates::Impossible, 1);
    history(1_050).check(Duplicates::Possible).unwrap();
    history(900).rejected_always(1);
}

/// The search gives up, with an error that says so, when the bound is reached.
#[test]
fn the_search_bound_is_an_explicit_error() {
    let hand = two_holders();
    let ops: Vec<(usize, &HistoryOp)> = hand.ops.iter().enumerate().collect();
    let history = ActorHistory::new(
        &hand.ops[0].actor_id,
        &ops,
        u64::MAX,
        Start::empty(),
        Duplicates::Possible.into(),
    );
    match search::check_actor_within(&history, 2) {
        Err(LinearizabilityError::SearchBound {
            states_explored, ..
        }) => assert_eq!(states_explored, 3),
        other => panic!(
            "expected the bound, got {:?}",
            other.map(|o| o.linearizable)
        ),
    }
}

/// A correct store that records what its clients saw: each request takes effect at the given
/// instant, inside the interval it is recorded with.
#[derive(Default)]
struct Recorded {
    record: Option<LeaseRecord>,
    ops: Vec<HistoryOp>,
}

impl Recorded {
    /// Applies the request at `at_ms` and records it as invoked at `invoked_ms` and answered
    /// at `responded_ms`; returns the granted token, if any.
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
        reply.as_ref().ok().map(|lease| lease.fencing_token.0)
    }

    /// Records a request whose outcome the node never learned; applies it at `at_ms` if given.
    fn unanswered(&mut self, request: LeaseRequest, invoked_ms: u64, at_ms: Option<u64>) {
        if let Some(at_ms) = at_ms {
            let _ = self.apply(&request, at_ms);
        }
        self.ops.push(HistoryOp {
            actor_id: actor(),
            request,
            invoked_ms,
            outcome: OpOutcome::Failed {
                responded_ms: invoked_ms + 200,
                error: StoreError::CommitUnknown {
                    reason: "no reply".into(),
                },
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

#[test]
fn a_correct_sequential_history_is_linearizable() {
    let mut store = Recorded::default();
    let token = store.answered(request("n1", LeaseOp::Acquire, None), (0, 2, 4));
    store.answered(request("n2", LeaseOp::Acquire, None), (10, 11, 12));
    store.answered(request("n1", LeaseOp::Renew, token), (300, 305, 306));
    store.answered(request("n1", LeaseOp::Release, token), (600, 601, 603));
    store.answered(request("n2", LeaseOp::Acquire, None), (610, 615, 620));
    let report = check_history(&store.ops, Duplicates::Impossible).unwrap();
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
    check_history(&store.ops, Duplicates::Impossible).unwrap();
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
    let report = check_history(&store.ops, Duplicates::Impossible).unwrap();
    assert_eq!(report.unknown_operations, 7);
}

#[test]
fn a_stale_renewal_is_caught_with_its_window() {
    // The store decides the last renewal on the record as it was before the one before.
    let store = stale_renewal_history();
    let error = check_history(&store.ops, Duplicates::Impossible).unwrap_err();
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
    // With duplicates the stale renewal is still caught: a duplicate of the first renewal
    // would make the count 2, never 1 again.
    assert!(check_history(&store.ops, Duplicates::Possible).is_err());
}

/// The history of [`a_stale_renewal_is_caught_with_its_window`]: nine operations, the last a
/// renewal decided on a stale record.
fn stale_renewal_history() -> Recorded {
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
    store.record = before;
    store.answered(request("n1", LeaseOp::Renew, token), (3_200, 3_201, 3_202));
    store
}

#[test]
fn a_narrowing_that_gives_up_reports_the_whole_history_not_a_search_bound() {
    let store = stale_renewal_history();
    let ops: Vec<(usize, &HistoryOp)> = store.ops.iter().enumerate().collect();
    let delivery = Delivery::from(Duplicates::Impossible);
    // With room to search, the window narrows to the stale renewal alone.
    let narrowed = report::offending_window(&actor(), &ops, delivery);
    assert_eq!(narrowed.operations.len(), 1, "{narrowed}");
    // A narrowing whose every search gives up still reports the violation, over the whole
    // history, and says why it is not smaller.
    let whole = report::offending_window_within(&actor(), &ops, delivery, 1);
    assert_eq!(whole.operations.len(), 9, "{whole}");
    assert_eq!(whole.history_operations, 9);
    assert_eq!((whole.from_ms, whole.to_ms), (0, 3_202));
    assert!(
        whole.start.contains("gave up after 1 search states"),
        "{whole}"
    );
    assert_eq!(whole.stuck_at, None);
}

#[test]
fn the_models_coverage_marks_are_not_counted() {
    let mut store = Recorded::default();
    store.answered(request("n1", LeaseOp::Acquire, None), (0, 1, 2));
    store.answered(request("n2", LeaseOp::Acquire, None), (2_000, 2_001, 2_002));
    let _ = kelpie_core::coverage::take_hits();
    kelpie_core::coverage::mark("test.before");
    check_history(&store.ops, Duplicates::Impossible).unwrap();
    let hits = kelpie_core::coverage::take_hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits.get("test.before"), Some(&1));
}

/// One request of a random history: when it was sent, when (if ever) it took effect, a second
/// effect if the network duplicated it, and whether its reply came back.
struct Sent {
    request: LeaseRequest,
    invoked_ms: u64,
    at_ms: Option<u64>,
    duplicate_at_ms: Option<u64>,
    responded_ms: Option<u64>,
}

/// A random history of a correct store: three nodes acquire, renew and release (with the
/// tokens they were granted, or stale ones), requests take effect at random instants within
/// their intervals, some never arrive, some replies are lost, and with `duplicates` some
/// requests take effect a second time later.
fn random_history(seed: u64, duplicates: bool) -> Vec<HistoryOp> {
    random_history_with_log(seed, duplicates).0
}

/// [`random_history`] with the log of what its store applied, in order.
fn random_history_with_log(seed: u64, duplicates: bool) -> (Vec<HistoryOp>, Vec<StoreEffect>) {
    let mut rng = DeterministicRng::new(seed);
    let nodes = ["n0", "n1", "n2"];
    let mut tokens = [None; 3];
    let mut sent = Vec::new();
    let mut now_ms = 0;
    for _ in 0..rng.gen_range(5..30) {
        now_ms += rng.gen_range(0..150u64);
        let n = rng.gen_range(0..3usize);
        let op = match rng.gen_range(0..4) {
            0 | 1 => LeaseOp::Acquire,
            2 => LeaseOp::Renew,
            _ => LeaseOp::Release,
        };
        let token = match op {
            LeaseOp::Acquire => None,
            _ => tokens[n].or(Some(1)),
        };
        let mut request = LeaseRequest::new(op, node(nodes[n]), rng.gen_range(100..400u64));
        request.fencing_token = token.map(FencingToken);
        let at_ms = (!rng.gen_bool(0.1)).then(|| now_ms + rng.gen_range(0..60u64));
        let responded_ms = match at_ms {
            Some(at_ms) if !rng.gen_bool(0.15) => Some(at_ms + rng.gen_range(0..60u64)),
            _ => None,
        };
        let duplicate_at_ms = (duplicates && rng.gen_bool(0.2))
            .then(|| now_ms + rng.gen_range(0..600u64))
            .filter(|&at| Some(at) != at_ms);
        sent.push(Sent {
            request,
            invoked_ms: now_ms,
            at_ms,
            duplicate_at_ms,
            responded_ms,
        });
        // Renewals and releases carry a token the node may or may not hold (stale, or one
        // it was never granted): the store must refuse them as `decide` does.
        if op == LeaseOp::Acquire && rng.gen_bool(0.5) {
            tokens[n] = Some(rng.gen_range(1..4));
        }
    }
    // Effects in instant order (ties by sending order), the duplicate after the original.
    let mut effects: Vec<(u64, usize, bool)> = Vec::new();
    for (i, s) in sent.iter().enumerate() {
        if let Some(at) = s.at_ms {
            effects.push((at, i, false));
        }
        if let Some(at) = s.duplicate_at_ms {
            effects.push((at, i, true));
        }
    }
    effects.sort();
    let mut record: Option<LeaseRecord> = None;
    let mut replies = vec![None; sent.len()];
    let mut log = Vec::new();
    let mut record_version = 0;
    for (at_ms, i, duplicate) in effects {
        let decision = decide(&actor(), record.as_ref(), &sent[i].request, at_ms);
        log.push(StoreEffect {
            actor_id: actor(),
            request: sent[i].request.clone(),
            store_now_ms: at_ms,
            record_version,
            reply: decision.reply.clone(),
            wrote: decision.write.is_some(),
        });
        if let Some(written) = decision.write {
            record = Some(written);
            record_version += 1;
        }
        if !duplicate {
            replies[i] = Some(decision.reply);
        }
    }
    let ops = sent
        .iter()
        .zip(replies)
        .map(|(s, reply)| {
            let outcome = match (s.responded_ms, reply) {
                (Some(responded_ms), Some(reply)) => OpOutcome::Returned {
                    responded_ms,
                    reply,
                },
                _ => OpOutcome::Failed {
                    responded_ms: s.invoked_ms + 200,
                    error: StoreError::CommitUnknown {
                        reason: "no reply".into(),
                    },
                },
            };
            HistoryOp {
                actor_id: actor(),
                request: s.request.clone(),
                invoked_ms: s.invoked_ms,
                outcome,
            }
        })
        .collect();
    (ops, log)
}

/// Completeness on random histories of a correct store: every one is accepted, with
/// duplicates allowed exactly where the store duplicated.
#[test]
fn random_histories_of_a_correct_store_are_accepted() {
    for seed in 0..400 {
        for duplicates in [false, true] {
            let ops = random_history(seed, duplicates);
            if let Err(error) = check_history(&ops, Duplicates::possible_if(duplicates)) {
                let shown: Vec<String> = ops.iter().map(ToString::to_string).collect();
                panic!(
                    "seed {seed}, duplicates {duplicates}: {error}\n{}",
                    shown.join("\n")
                );
            }
        }
    }
}

/// The log of a correct store linearizes its history with no search: one replay, checked.
#[test]
fn a_correct_stores_log_linearizes_its_history_without_a_search() {
    for seed in 0..400 {
        for duplicates in [false, true] {
            let (ops, log) = random_history_with_log(seed, duplicates);
            let delivery = Duplicates::possible_if(duplicates);
            let report = check_history_with_store_log(&ops, delivery, &log)
                .unwrap_or_else(|error| panic!("seed {seed}, duplicates {duplicates}: {error}"));
            assert_eq!(
                (
                    report.actors_linearized_by_store_log,
                    report.states_explored
                ),
                (1, 0),
                "seed {seed}, duplicates {duplicates}: the log was not read as a linearization"
            );
        }
    }
}

/// `ops` with one answered reply changed (seeded): a grant's token one higher, or a refusal
/// turned into a grant; mostly no longer linearizable.
fn with_one_reply_changed(mut ops: Vec<HistoryOp>, rng: &mut DeterministicRng) -> Vec<HistoryOp> {
    let answered: Vec<usize> = (0..ops.len())
        .filter(|&i| ops[i].reply().is_some())
        .collect();
    if answered.is_empty() {
        return ops;
    }
    let op = &mut ops[answered[rng.gen_range(0..answered.len())]];
    let node_id = op.request.node_id.to_string();
    if let OpOutcome::Returned { reply, .. } = &mut op.outcome {
        *reply = match reply {
            Ok(lease) => Ok(Lease {
                fencing_token: FencingToken(lease.fencing_token.0 + 1),
                ..lease.clone()
            }),
            Err(_) => Ok(lease(&node_id, 1, 0, LEASE_MS, 0)),
        };
    }
    ops
}

/// Logs that are wrong in the ways a store's log could be: instants moved, effects missing,
/// repeated or out of order, a write taken for one that failed, or nothing logged.
fn wrong_logs(log: &[StoreEffect], rng: &mut DeterministicRng) -> Vec<Vec<StoreEffect>> {
    let mut logs = vec![Vec::new()];
    if log.is_empty() {
        return logs;
    }
    let at = rng.gen_range(0..log.len());
    let mut moved = log.to_vec();
    for effect in &mut moved {
        let shift_ms = rng.gen_range(0..100u64);
        effect.store_now_ms = match rng.gen_bool(0.5) {
            true => effect.store_now_ms + shift_ms,
            false => effect.store_now_ms.saturating_sub(shift_ms),
        };
    }
    let mut missing = log.to_vec();
    missing.remove(at);
    let mut repeated = log.to_vec();
    repeated.insert(at, log[at].clone());
    // The next effect saw the version this one did: its write taken for one that failed.
    let mut not_landed = log.to_vec();
    if let Some(next) = not_landed.get_mut(at + 1) {
        next.record_version = log[at].record_version;
    }
    let mut swapped = log.to_vec();
    swapped.swap(at, rng.gen_range(0..log.len()));
    // A reply the store did not give: another effect's, or an error.
    let mut misreplied = log.to_vec();
    misreplied[at].reply = match rng.gen_bool(0.5) {
        true => log[rng.gen_range(0..log.len())].reply.clone(),
        false => not_holder("n1", None),
    };
    // A write taken for no write, or the other way round.
    let mut miswritten = log.to_vec();
    miswritten[at].wrote = !log[at].wrote;
    logs.extend([
        moved, missing, repeated, not_landed, swapped, misreplied, miswritten,
    ]);
    logs
}

/// A log never changes a verdict: with the store's own log, a wrong one or none, every history
/// (a correct store's, or one with a reply changed) gets the answer the search gives alone.
#[test]
fn a_store_log_never_changes_the_verdict() {
    let (mut rejected, mut accepted_by_log) = (0, 0);
    for seed in 0..100 {
        for duplicates in [false, true] {
            let mut rng = DeterministicRng::new(seed + 1_000_000);
            let delivery = Duplicates::possible_if(duplicates);
            let (ops, log) = random_history_with_log(seed, duplicates);
            let ops = match rng.gen_bool(0.7) {
                true => with_one_reply_changed(ops, &mut rng),
                false => ops,
            };
            let expected = check_history(&ops, delivery);
            rejected += usize::from(expected.is_err());
            let mut logs = wrong_logs(&log, &mut rng);
            logs.push(log);
            for log in &logs {
                let got = check_history_with_store_log(&ops, delivery, log);
                match (&expected, &got) {
                    (Err(expected), Err(got)) => assert_eq!(expected, got, "seed {seed}"),
                    (Ok(expected), Ok(got)) => {
                        assert_eq!(
                            (expected.operations_checked, expected.unknown_operations),
                            (got.operations_checked, got.unknown_operations),
                            "seed {seed}"
                        );
                        accepted_by_log += got.actors_linearized_by_store_log;
                    }
                    _ => panic!(
                        "seed {seed}, duplicates {duplicates}: without a log {expected:?}, \
                         with {log:?}: {got:?}"
                    ),
                }
            }
        }
    }
    // The changed replies made histories the check rejects, and logs did linearize others.
    assert!(rejected >= 100, "only {rejected} of 200 histories rejected");
    assert!(
        accepted_by_log >= 50,
        "only {accepted_by_log} actors linearized by a log"
    );
}

/// n1 acquires (answered), its release is never answered, then n2 acquires (answered): the
/// history `Witness::verify` is shown each wrong linearization of.
fn release_then_grant() -> Vec<HistoryOp> {
    n1_acquired()
        .unanswered(request("n1", LeaseOp::Release, Some(1)), 500)
        .answered(
            request("n2", LeaseOp::Acquire, None),
            (600, 602),
            Ok(lease("n2", 2, 601, 1_601, 0)),
        )
        .ops
}

/// `Witness::verify` accepts the one linearization of `release_then_grant` and rejects each
/// way of getting it wrong, saying which.
#[test]
fn a_proposed_linearization_is_verified_not_trusted() {
    use super::search::{Placed, Witness};
    let ops = release_then_grant();
    let indexed: Vec<(usize, &HistoryOp)> = ops.iter().enumerate().collect();
    let actor_id = actor();
    let history = actor::ActorHistory::new(
        &actor_id,
        &indexed,
        u64::MAX,
        actor::Start::empty(),
        within(100),
    );
    let (d0, d1) = (Placed::Definite(0), Placed::Definite(1));
    let u = Placed::Unseen { kind: 0, member: 0 };
    let verify = |steps: &[Placed], instants: &[i64]| {
        Witness::proposed(&history, steps.to_vec(), instants.to_vec()).verify()
    };
    let right = [Placed::Start, d0, u, d1];
    assert_eq!(verify(&right, &[0, 0, 1, 550, 601]), Ok(()));
    let wrong: [(&[Placed], &[i64], &str); 16] = [
        (&right, &[0, 0, 1, 550], "4 instants for 4 steps"),
        (&right, &[0, 0, 1, 550, 549], "goes back"),
        // Before time began (the first instant, so nothing earlier to go back from).
        (
            &right,
            &[0, -1, 1, 550, 601],
            "instant -1 ms goes back from -9223372036854775808 ms",
        ),
        (&right, &[0, 1, 1, 550, 601], "the start placed at 1 ms"),
        (
            &[Placed::Start, d0, Placed::Start, u, d1],
            &[0, 0, 1, 1, 550, 601],
            "a start at",
        ),
        (
            &[d0, u, d1],
            &[0, 1, 550, 601],
            "does not begin at the start",
        ),
        (
            &[Placed::Start, Placed::Definite(7)],
            &[0, 0, 1],
            "no answered operation 7",
        ),
        (
            &[Placed::Start, d0, d0, u, d1],
            &[0, 0, 1, 1, 550, 601],
            "n1 acquire [0 ms .. 2 ms] -> granted token 1, acquired 1 ms, expires 1001 ms, \
             renewals 0 placed twice",
        ),
        (
            &[Placed::Start, d0, u, d1],
            &[0, 0, 1, 550, 603],
            "placed at 603 ms",
        ),
        // n2's acquire, invoked at 600, placed before it was sent.
        (
            &[Placed::Start, d0, u, d1],
            &[0, 0, 1, 550, 599],
            "n2 acquire [600 ms .. 602 ms] -> granted token 2, acquired 601 ms, expires 1601 ms, \
             renewals 0 placed at 599 ms",
        ),
        (
            &[Placed::Start, d0, Placed::Unseen { kind: 3, member: 0 }],
            &[0, 0, 1, 550],
            "no unseen effect 3.0",
        ),
        (
            &[Placed::Start, d0, u, u, d1],
            &[0, 0, 1, 550, 560, 601],
            "the unseen effect invoked at 500 ms placed twice",
        ),
        // The release, sent at 500 and bound to take effect within 100 ms, placed at 601.
        (
            &[Placed::Start, d0, u, d1],
            &[0, 0, 1, 601, 601],
            "an unseen effect invoked at 500 ms placed at 601 ms",
        ),
        (
            &[Placed::Start, d0, u, d1],
            &[0, 0, 1, 499, 601],
            "invoked at 500 ms placed at 499 ms",
        ),
        (
            &[Placed::Start, d0, d1, u],
            &[0, 0, 1, 601, 601],
            "decide answers",
        ),
        (&[Placed::Start, d0, u], &[0, 0, 1, 550], "is not placed"),
    ];
    for (steps, instants, why) in wrong {
        match verify(steps, instants) {
            Ok(()) => panic!("{steps:?} at {instants:?} accepted"),
            Err(said) => assert!(said.contains(why), "{steps:?} at {instants:?}: {said}"),
        }
    }
    // A start whose record was written no earlier than 5 ms, placed at 3 ms.
    let late_start = actor::Start {
        t_min_ms: 5,
        t_max_ms: 10,
        ..actor::Start::empty()
    };
    let history_late_start =
        actor::ActorHistory::new(&actor_id, &indexed, u64::MAX, late_start, within(100));
    let said = Witness::proposed(&history_late_start, right.to_vec(), vec![0, 3, 3, 550, 601])
        .verify()
        .expect_err("a start placed before its record was written");
    assert!(said.contains("the start placed at 3 ms"), "{said}");
    // An unseen effect must write: n2's release of token 1 while n1 holds it writes nothing.
    let ops = n1_acquired()
        .unanswered(request("n2", LeaseOp::Release, Some(1)), 100)
        .ops;
    let indexed: Vec<(usize, &HistoryOp)> = ops.iter().enumerate().collect();
    let history = actor::ActorHistory::new(
        &actor_id,
        &indexed,
        u64::MAX,
        actor::Start::empty(),
        Duplicates::Impossible.into(),
    );
    let said = Witness::proposed(&history, vec![Placed::Start, d0, u], vec![0, 0, 1, 150])
        .verify()
        .expect_err("a release that writes nothing, placed unseen");
    assert!(said.contains("writes nothing"), "{said}");
}

/// Two identical releases, both refused, the later one answered first: the store's refusal
/// at 220 ms answers the one whose response comes first (the later, at 250), so the refusal at
/// 300 can still answer the earlier (at 400). Pairing the earlier one first would leave the
/// later one unanswered, and the search to do.
#[test]
fn a_logged_effect_answers_the_operation_whose_response_comes_first() {
    let release = || request("n1", LeaseOp::Release, Some(1));
    let ops = n1_acquired()
        .answered(release(), (100, 400), not_holder("n1", None))
        .answered(release(), (200, 250), not_holder("n1", None))
        .ops;
    // The store's log: each request with the reply it decided on the record before it.
    let mut record = None;
    let mut logged = |request: LeaseRequest, store_now_ms, record_version| {
        let decision = decide(&actor(), record.as_ref(), &request, store_now_ms);
        let wrote = decision.write.is_some();
        if let Some(written) = decision.write {
            record = Some(written);
        }
        StoreEffect {
            actor_id: actor(),
            request,
            store_now_ms,
            record_version,
            reply: decision.reply,
            wrote,
        }
    };
    let log = [
        logged(request("n1", LeaseOp::Acquire, None), 1, 0),
        // The first release's first delivery: it released, and its reply was never seen.
        logged(release(), 150, 1),
        logged(release(), 220, 2),
        logged(release(), 300, 2),
    ];
    let report = check_history_with_store_log(&ops, Duplicates::Possible, &log)
        .expect("a duplicated release, then two refusals");
    assert_eq!(
        (
            report.actors_linearized_by_store_log,
            report.states_explored
        ),
        (1, 0)
    );
}

/// An answer before its request is no history a run records: it is refused as malformed,
/// with the operation named, where it panicked inside the search's narrowing before.
#[test]
fn a_reply_before_its_request_is_a_malformed_history_not_a_panic() {
    let backwards = n1_acquired().answered(
        request("n1", LeaseOp::Renew, Some(1)),
        (400, 300),
        Ok(lease("n1", 1, 1, 1_300, 1)),
    );
    for duplicates in [Duplicates::Impossible, Duplicates::Possible] {
        match backwards.check(duplicates) {
            Err(LinearizabilityError::MalformedHistory {
                index: 1,
                invoked_ms: 400,
                responded_ms: 300,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
    // The same operation answered at its invocation instant is well formed.
    let instant = n1_acquired().answered(
        request("n1", LeaseOp::Renew, Some(1)),
        (400, 400),
        Ok(lease("n1", 1, 1, 1_400, 1)),
    );
    instant.accepted();
}
