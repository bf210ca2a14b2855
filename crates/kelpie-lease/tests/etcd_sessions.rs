//! What the etcd backend offers beyond the conformance suite: node sessions (one etcd lease and
//! one keepalive stream per node), fencing across incarnations of a node, atomic fenced renew
//! and release, fast handover through a watch, and what it stores in etcd. These run against
//! the etcd at `KELPIE_ETCD_ENDPOINTS` and say they were skipped without it.

mod etcd_support;

use etcd_support::{shared_etcd, sleep_ms, Stopwatch};
use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::{
    limits::ETCD_EXPIRY_CHECK_INTERVAL_MS, EtcdLeaseManager, EtcdOptions, LeaseConfig, LeaseError,
    LeaseManager, LeaseSession, SessionConfig, StoreError,
};

/// The lease duration: etcd's minimum TTL under its default election settings.
const LEASE_DURATION_MS: u64 = 2_000;

/// Long enough for a lease granted or renewed now to be expired and deleted by etcd.
const EXPIRY_WAIT_MS: u64 = LEASE_DURATION_MS + 2 * ETCD_EXPIRY_CHECK_INTERVAL_MS;

/// Actors one node holds in the session tests.
const ACTORS_PER_NODE: usize = 40;

fn actor(name: &str) -> ActorId {
    ActorId::new(name).unwrap()
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

async fn manager(options: &EtcdOptions) -> EtcdLeaseManager {
    let lease = LeaseConfig::new(LEASE_DURATION_MS).unwrap();
    EtcdLeaseManager::connect(options.clone().with_lease_config(lease))
        .await
        .unwrap()
}

/// A plain client on the same etcd, to look at what the backend stored.
async fn raw_client(options: &EtcdOptions) -> etcd_client::Client {
    etcd_client::Client::connect(&options.endpoints, None)
        .await
        .unwrap()
}

/// Acquires every actor of `held` for `node_id` at once, well inside one lease duration (one
/// after the other they can take longer, and the first would then be abandoned: see
/// `a_key_nobody_renews_is_deleted_though_its_session_lives`).
async fn acquire_all(m: &EtcdLeaseManager, held: &[ActorId], node_id: &NodeId) {
    let acquiring = held.iter().map(|a| m.acquire(a, node_id));
    for acquired in futures::future::join_all(acquiring).await {
        acquired.unwrap();
    }
}

fn actors(count: usize) -> Vec<ActorId> {
    (0..count)
        .map(|i| actor(&format!("actor-{i:03}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_and_one_keepalive_cover_all_of_a_nodes_actors() {
    let Some(options) = shared_etcd("one_session_per_node") else {
        return;
    };
    let m = manager(&options).await;
    let n1 = node("n1");
    let held = actors(ACTORS_PER_NODE);
    acquire_all(&m, &held, &n1).await;
    assert_eq!(m.stats().sessions_granted, 1);
    let session = m.node_session(&n1).unwrap();
    // Every key hangs off the node's one etcd lease.
    let mut raw = raw_client(&options).await;
    let ttl_options = etcd_client::LeaseTimeToLiveOptions::new().with_keys();
    let attached = raw
        .lease_time_to_live(session.lease_id, Some(ttl_options))
        .await
        .unwrap();
    assert_eq!(attached.keys().len(), ACTORS_PER_NODE);
    // Keep the node alive for three TTLs with one keepalive per third of a TTL, never renewing
    // an actor: every lease survives, for one round trip each time whatever the actor count.
    let before = m.stats().keep_alives_sent;
    let rounds = 9;
    for _ in 0..rounds {
        sleep_ms(LEASE_DURATION_MS / 3).await;
        assert!(m.keep_alive_node(&n1).await.unwrap().is_some());
    }
    assert_eq!(m.stats().keep_alives_sent - before, rounds);
    assert_eq!(m.leases_held_by(&n1).await.unwrap().len(), ACTORS_PER_NODE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_renewals_share_keepalives() {
    let Some(options) = shared_etcd("renewals_share_keepalives") else {
        return;
    };
    let m = manager(&options).await;
    let n1 = node("n1");
    let held = actors(ACTORS_PER_NODE);
    acquire_all(&m, &held, &n1).await;
    let before = m.stats().keep_alives_sent;
    let renewals = held.iter().map(|a| m.renew(a, &n1));
    for renewed in futures::future::join_all(renewals).await {
        renewed.unwrap();
    }
    let sent = m.stats().keep_alives_sent - before;
    etcd_support::notice(&format!(
        "etcd_sessions: {ACTORS_PER_NODE} concurrent renewals sent {sent} keepalives"
    ));
    assert!(sent < ACTORS_PER_NODE as u64 / 2, "{sent} keepalives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_nobody_renews_is_deleted_though_its_session_lives() {
    let Some(options) = shared_etcd("abandoned_key_deleted") else {
        return;
    };
    let m = manager(&options).await;
    let (n1, a, b) = (node("n1"), actor("a"), actor("b"));
    m.acquire(&a, &n1).await.unwrap();
    m.acquire(&b, &n1).await.unwrap();
    for _ in 0..3 {
        sleep_ms(LEASE_DURATION_MS * 2 / 3).await;
        m.renew(&a, &n1).await.unwrap();
    }
    // Two lease durations have passed and `b` was never renewed: its lease ran out, and
    // although `a`'s renewals keep the session (which `b`'s key hangs off) alive, the manager
    // deleted `b`'s key at a renewal after that, so another node can take it.
    assert!(m.is_valid(&a, &n1).await.unwrap());
    assert!(!m.is_valid(&b, &n1).await.unwrap());
    m.acquire(&b, &node("n2")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_takes_all_its_leases_and_the_next_acquire_starts_another() {
    let Some(options) = shared_etcd("session_expiry") else {
        return;
    };
    let m = manager(&options).await;
    let n1 = node("n1");
    let held = actors(3);
    let mut first_tokens = Vec::new();
    for a in &held {
        first_tokens.push(m.acquire(a, &n1).await.unwrap().fencing_token);
    }
    let first_session = m.node_session(&n1).unwrap().lease_id;
    sleep_ms(EXPIRY_WAIT_MS).await;
    assert!(m.leases_held_by(&n1).await.unwrap().is_empty());
    let error = m.renew(&held[0], &n1).await.unwrap_err();
    assert!(
        matches!(
            error,
            LeaseError::NotHolder { holder: None, .. } | LeaseError::Expired { .. }
        ),
        "{error:?}"
    );
    let again = m.acquire(&held[0], &n1).await.unwrap();
    assert!(again.fencing_token > first_tokens[0]);
    assert_eq!(m.stats().sessions_granted, 2);
    assert_ne!(m.node_session(&n1).unwrap().lease_id, first_session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_node_releases_all_its_leases_at_once() {
    let Some(options) = shared_etcd("revoke_node") else {
        return;
    };
    let m = manager(&options).await;
    let (n1, n2) = (node("n1"), node("n2"));
    for a in actors(5) {
        m.acquire(&a, &n1).await.unwrap();
    }
    m.acquire(&actor("other"), &n2).await.unwrap();
    assert!(m.revoke_node(&n1).await.unwrap());
    assert!(m.leases_held_by(&n1).await.unwrap().is_empty());
    assert_eq!(m.leases_held_by(&n2).await.unwrap().len(), 1);
    // Another node can take them at once, without waiting for a TTL.
    m.acquire(&actors(1)[0], &n2).await.unwrap();
    assert!(!m.revoke_node(&n1).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_incarnation_of_a_node_fences_off_the_old_one() {
    let Some(options) = shared_etcd("incarnations") else {
        return;
    };
    // Two managers with the same node id: a node restarted while its old process lingers.
    let (old, new) = (manager(&options).await, manager(&options).await);
    let (n1, a) = (node("n1"), actor("a"));
    let first = old.acquire(&a, &n1).await.unwrap();
    let second = new.acquire(&a, &n1).await.unwrap();
    assert!(second.fencing_token > first.fencing_token);
    assert!(matches!(
        old.renew(&a, &n1).await,
        Err(LeaseError::NotHolder { .. } | LeaseError::Expired { .. })
    ));
    assert!(matches!(
        old.release_fenced(&a, &n1, first.fencing_token).await,
        Err(LeaseError::NotHolder { .. })
    ));
    let renewed = new.renew(&a, &n1).await.unwrap();
    assert_eq!(renewed.fencing_token, second.fencing_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_renew_and_release_refuse_an_earlier_tenure() {
    let Some(options) = shared_etcd("fenced_ops") else {
        return;
    };
    let m = manager(&options).await;
    let (n1, a) = (node("n1"), actor("a"));
    let first = m.acquire(&a, &n1).await.unwrap();
    m.release(&a, &n1).await.unwrap();
    let second = m.acquire(&a, &n1).await.unwrap();
    assert!(second.fencing_token > first.fencing_token);
    for stale in [first.fencing_token, FencingToken(u64::MAX)] {
        assert!(matches!(
            m.renew_fenced(&a, &n1, stale).await,
            Err(LeaseError::NotHolder { .. })
        ));
        assert!(matches!(
            m.release_fenced(&a, &n1, stale).await,
            Err(LeaseError::NotHolder { .. })
        ));
    }
    let renewed = m.renew_fenced(&a, &n1, second.fencing_token).await.unwrap();
    assert_eq!(renewed.renewal_count, 1);
    m.release_fenced(&a, &n1, second.fencing_token)
        .await
        .unwrap();
    assert_eq!(m.get(&a).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contender_acquires_right_after_a_release() {
    let Some(options) = shared_etcd("fast_handover") else {
        return;
    };
    let (holder, contender) = (manager(&options).await, manager(&options).await);
    let (n1, n2, a) = (node("n1"), node("n2"), actor("a"));
    let first = holder.acquire(&a, &n1).await.unwrap();
    let waiting = async {
        let lease = contender.acquire_waiting(&a, &n2, 10_000).await.unwrap();
        (lease, Stopwatch::start())
    };
    let releasing = async {
        sleep_ms(300).await;
        holder.release(&a, &n1).await.unwrap();
        Stopwatch::start()
    };
    let ((lease, acquired), released) = tokio::join!(waiting, releasing);
    // Both stopwatches started when their side finished; the release finished first.
    let handover_ms = released.elapsed_ms().saturating_sub(acquired.elapsed_ms());
    etcd_support::notice(&format!(
        "etcd_sessions: handover after release took {handover_ms} ms"
    ));
    assert_eq!(lease.holder, n2);
    assert!(lease.fencing_token > first.fencing_token);
    // Far less than a TTL: the contender did not wait for expiry or a polling interval.
    assert!(handover_ms < LEASE_DURATION_MS / 4, "{handover_ms} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_held_lease_ends_at_its_expiry_or_the_deadline() {
    let Some(options) = shared_etcd("wait_until_free") else {
        return;
    };
    let m = manager(&options).await;
    let (n1, a) = (node("n1"), actor("a"));
    assert!(m.wait_until_free(&a, 10).await.unwrap(), "a free lease");
    m.acquire(&a, &n1).await.unwrap();
    let watch = Stopwatch::start();
    assert!(!m.wait_until_free(&a, 300).await.unwrap(), "still held");
    assert!(watch.elapsed_ms() >= 300);
    // Never renewed: etcd expires it and the waiter sees the deletion.
    assert!(m.wait_until_free(&a, 10_000).await.unwrap());
    let waited_ms = watch.elapsed_ms();
    assert!(waited_ms < LEASE_DURATION_MS + 4 * ETCD_EXPIRY_CHECK_INTERVAL_MS);
    let error = m.acquire_waiting(&a, &n1, 10).await;
    assert!(error.is_ok(), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_by_other_reports_an_upper_bound_of_the_expiry() {
    let Some(options) = shared_etcd("held_by_other") else {
        return;
    };
    let (holder, contender) = (manager(&options).await, manager(&options).await);
    let (n1, n2, a) = (node("n1"), node("n2"), actor("a"));
    holder.acquire(&a, &n1).await.unwrap();
    let before_ms = contender_now_ms(&contender, &n2).await;
    let Err(LeaseError::HeldByOther { expires_at_ms, .. }) = contender.acquire(&a, &n2).await
    else {
        panic!("expected HeldByOther");
    };
    // On the contender's clock: at least the remaining TTL (up to the whole TTL), at most the
    // TTL plus the one second added to etcd's truncated answer.
    assert!(expires_at_ms >= before_ms, "{expires_at_ms} < {before_ms}");
    assert!(expires_at_ms <= before_ms + LEASE_DURATION_MS + 1_000 + 500);
}

/// The contender's clock now, read through a session it holds.
async fn contender_now_ms(m: &EtcdLeaseManager, node_id: &NodeId) -> u64 {
    m.acquire(&actor("clock-probe"), node_id).await.unwrap();
    let session = m.node_session(node_id).unwrap();
    session.expires_at_ms - session.ttl_ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_the_prefix_plus_the_actor_and_foreign_keys_are_refused() {
    let Some(options) = shared_etcd("layout") else {
        return;
    };
    let m = manager(&options).await;
    let (n1, a) = (node("n1"), actor("a/with:punctuation"));
    let lease = m.acquire(&a, &n1).await.unwrap();
    let mut raw = raw_client(&options).await;
    let key = format!("{}a/with:punctuation", m.key_prefix());
    let stored = raw.get(key.as_str(), None).await.unwrap();
    let kv = &stored.kvs()[0];
    assert_eq!(kv.value(), b"n1");
    assert_eq!(
        u64::try_from(kv.create_revision()).unwrap(),
        lease.fencing_token.0
    );
    assert_eq!(kv.lease(), m.node_session(&n1).unwrap().lease_id);
    // A key written under the prefix by someone else, without a lease, is not a lease.
    let foreign = format!("{}foreign", m.key_prefix());
    raw.put(foreign.as_str(), "n2", None).await.unwrap();
    let error = m.get(&actor("foreign")).await.unwrap_err();
    assert!(
        matches!(error, LeaseError::Store(StoreError::Corrupt { .. })),
        "{error:?}"
    );
    raw.delete(foreign.as_str(), None).await.unwrap();
}

/// Campaigns wait by watch on etcd: with a poll so long (half a minute at least) that only a
/// watch can explain it, a campaigning session holds the actor within moments of the holder's
/// release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_takes_over_by_watch_within_moments_of_a_release() {
    let Some(options) = shared_etcd("campaign_by_watch") else {
        return;
    };
    /// Longest handover a watch allows; a poll would wait at least half of the minute.
    const HANDOVER_MS_MAX: u64 = 1_000;
    let config = SessionConfig::default().with_campaign_poll_ms_max(60_000);
    let start = |name: &str, manager: EtcdLeaseManager| {
        LeaseSession::start(std::sync::Arc::new(manager), node(name), config).unwrap()
    };
    let a = start("a", manager(&options).await);
    let b = start("b", manager(&options).await);
    let wanted = actor("watched");
    let held = a.acquire(&wanted).await.unwrap();
    let waiting = {
        let (b, wanted) = (b.clone(), wanted.clone());
        tokio::spawn(async move {
            let guard = b.campaign(&wanted).await;
            (guard, Stopwatch::start())
        })
    };
    // b has met the holder and is waiting by then.
    sleep_ms(300).await;
    assert!(!waiting.is_finished(), "b cannot hold it while a does");
    let released = Stopwatch::start();
    a.release(held).await.unwrap();
    let (guard, _) = waiting.await.unwrap();
    let handover_ms = released.elapsed_ms();
    let guard = guard.unwrap();
    println!("campaign by watch: held {handover_ms} ms after the release");
    assert!(
        handover_ms < HANDOVER_MS_MAX,
        "handover took {handover_ms} ms: the campaign polled instead of watching"
    );
    assert_eq!(guard.actor_id(), &wanted);
    drop(guard);
    b.shutdown().await;
    a.shutdown().await;
}

/// The etcd fenced state store checks the lease key itself: once the lease is released (no
/// successor yet) the old holder's write is refused as `NotHolder`, a successor's token as
/// `StaleToken`; state keys stay outside the lease range, so listing leases never reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_state_writes_need_the_live_lease_and_stay_out_of_lease_scans() {
    let Some(options) = shared_etcd("etcd_fenced_state") else {
        return;
    };
    use kelpie_lease::{FencedStateStore, StateError};
    let m = manager(&options).await;
    let state = m.fenced_state_store();
    let (a, n1, n2) = (actor("stateful"), node("n1"), node("n2"));
    let t1 = m.acquire(&a, &n1).await.unwrap().fencing_token;
    state.fence(&a, t1).await.unwrap();
    state.write(&a, t1, b"one").await.unwrap();
    assert_eq!(
        m.leases_held_by(&n1).await.unwrap().len(),
        1,
        "state keys are not leases"
    );
    m.release(&a, &n1).await.unwrap();
    let gone = state.write(&a, t1, b"after release").await.unwrap_err();
    assert!(matches!(gone, StateError::NotHolder { .. }), "{gone:?}");
    let gone = state.fence(&a, t1).await.unwrap_err();
    assert!(matches!(gone, StateError::NotHolder { .. }), "{gone:?}");
    let t2 = m.acquire(&a, &n2).await.unwrap().fencing_token;
    let stale = state.write(&a, t1, b"late").await.unwrap_err();
    assert!(
        matches!(stale, StateError::StaleToken { highest_token, .. } if highest_token == t2),
        "{stale:?}"
    );
    let fenced = state.fence(&a, t2).await.unwrap();
    assert_eq!(fenced.value.as_deref(), Some(&b"one"[..]));
    assert_eq!(m.leases_held_by(&n2).await.unwrap().len(), 1);
}

/// etcd refuses a request over its `--max-request-bytes` (1.5 MiB by default) with an error
/// that says nothing of the value ("etcdserver: request is too large"). The etcd state store
/// refuses a value over `ETCD_STATE_VALUE_BYTES_MAX` itself, as `ValueTooLarge` naming that
/// bound, from just over it up to the 16 MiB the other stores accept; a value of exactly the
/// bound is written and read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_state_values_over_the_etcd_bound_are_refused_as_too_large() {
    let Some(options) = shared_etcd("etcd_state_value_bound") else {
        return;
    };
    use kelpie_lease::limits::{ETCD_STATE_VALUE_BYTES_MAX, STATE_VALUE_BYTES_MAX};
    use kelpie_lease::{FencedStateStore, StateError};
    let m = manager(&options).await;
    let state = m.fenced_state_store();
    let (a, n1) = (actor("large-state"), node("n1"));
    let token = m.acquire(&a, &n1).await.unwrap().fencing_token;
    state.fence(&a, token).await.unwrap();
    let largest = vec![7u8; ETCD_STATE_VALUE_BYTES_MAX];
    state.write(&a, token, &largest).await.unwrap();
    let read = state.read(&a).await.unwrap().and_then(|s| s.value);
    assert!(read == Some(largest), "the largest value did not read back");
    let etcd_request_limit_bytes = 1_536 * 1_024;
    for bytes in [
        ETCD_STATE_VALUE_BYTES_MAX + 1,
        etcd_request_limit_bytes,
        STATE_VALUE_BYTES_MAX,
    ] {
        match state.write(&a, token, &vec![0u8; bytes]).await {
            Err(StateError::ValueTooLarge {
                bytes: refused,
                bytes_max,
                ..
            }) => {
                assert_eq!(refused, bytes);
                assert_eq!(bytes_max, ETCD_STATE_VALUE_BYTES_MAX);
            }
            other => panic!("{bytes} bytes: expected ValueTooLarge, got {other:?}"),
        }
    }
    // Nothing was written by the refused writes.
    let read = state.read(&a).await.unwrap().and_then(|s| s.value);
    assert_eq!(read.map(|v| v.len()), Some(ETCD_STATE_VALUE_BYTES_MAX));
}
