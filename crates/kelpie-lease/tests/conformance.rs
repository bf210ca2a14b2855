//! One suite, generic over the backend: a store is done when it passes the same cases as the
//! others, its fenced state store included. Each backend supplies a [`Backend`]: a fresh manager, a way to let time pass on
//! the store's clock and to read it, and a way to reopen the store (a new process opening the
//! same SQLite file, a new etcd client) so that what must survive a restart is checked too.

use std::future::Future;
#[cfg(feature = "etcd")]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
#[cfg(feature = "etcd")]
use std::time::Duration;

use kelpie_core::{ActorId, Clock, FencingToken, ManualClock, NodeId};
use kelpie_lease::{
    backend::SqliteLeaseStore, limits::STATE_VALUE_BYTES_MAX, FencedOp, FencedRequest,
    FencedStateStore, Lease, LeaseConfig, LeaseError, LeaseManager, MemoryFencedStateStore,
    MemoryLeaseManager, SqliteFencedStateStore, SqliteLeaseManager, SqliteOptions, StateError,
};
#[cfg(feature = "etcd")]
use kelpie_lease::{limits::ETCD_EXPIRY_CHECK_INTERVAL_MS, EtcdLeaseManager, EtcdOptions};

/// Lease duration every backend is configured with.
const LEASE_DURATION_MS: u64 = 1_000;

/// What the suite needs from a backend.
trait Backend: Send + Sync {
    type Manager: LeaseManager;
    type State: FencedStateStore;
    /// The manager under test, over an empty store.
    fn manager(&self) -> &Self::Manager;
    /// The backend's fenced state store, over an empty store.
    fn state(&self) -> &Self::State;
    /// Lets `duration_ms` pass on the store's clock.
    fn advance_ms(&self, duration_ms: u64) -> impl Future<Output = ()> + Send;
    /// The store's clock now, as the manager stamps leases with it.
    fn now_ms(&self) -> u64;
    /// Opens the store again from scratch, as a restarted process would: everything the
    /// suite checks afterwards was read back from durable state. The memory store cannot be
    /// reopened (it is gone with its process), so for it this does nothing.
    fn reopen(&mut self) -> impl Future<Output = ()> + Send;
    /// The lease duration the manager was configured with. etcd counts lease TTLs in whole
    /// seconds with a minimum of its own, so not every backend can use [`LEASE_DURATION_MS`].
    fn lease_duration_ms(&self) -> u64 {
        LEASE_DURATION_MS
    }
    /// Returns once the store no longer shows the leases on `actors`, which have expired:
    /// at once for stores that decide expiry when they read a record; etcd deletes expired
    /// leases from a periodic check, some time after their TTL.
    fn await_expired(&self, actors: &[ActorId]) -> impl Future<Output = ()> + Send {
        let _ = actors;
        async {}
    }
}

/// Lets the leases on `actors`, granted or renewed now, expire, and the store act on it.
async fn let_lease_expire<B: Backend>(b: &B, actors: &[ActorId]) {
    b.advance_ms(b.lease_duration_ms() + 1).await;
    b.await_expired(actors).await;
}

fn actor(name: &str) -> ActorId {
    ActorId::new(name).unwrap()
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

async fn acquire_free_lease_grants_first_token<B: Backend>(b: B) {
    let (m, a, n1) = (b.manager(), actor("a1"), node("n1"));
    let lease = m.acquire(&a, &n1).await.unwrap();
    assert_eq!(
        (lease.actor_id.clone(), lease.holder.clone()),
        (a.clone(), n1.clone())
    );
    assert!(lease.fencing_token > FencingToken::ZERO);
    assert!(lease.expires_at_ms > lease.acquired_at_ms);
    assert_eq!(m.get(&a).await.unwrap(), Some(lease));
    assert!(m.is_valid(&a, &n1).await.unwrap());
    assert!(!m.is_valid(&a, &node("n2")).await.unwrap());
    assert_eq!(m.get(&actor("never")).await.unwrap(), None);
}

async fn acquire_held_lease_names_holder_and_expiry<B: Backend>(mut b: B) {
    let a = actor("a1");
    let lease = b.manager().acquire(&a, &node("n1")).await.unwrap();
    b.reopen().await;
    let m = b.manager();
    // A new client sees the same holder and token (etcd reports times as this client
    // measures them, so only the identity of the lease is compared).
    let seen = m
        .get(&a)
        .await
        .unwrap()
        .map(|l| (l.holder, l.fencing_token));
    let held = (lease.holder.clone(), lease.fencing_token);
    assert_eq!(seen, Some(held), "the lease survives reopening");
    match m.acquire(&a, &node("n2")).await {
        Err(LeaseError::HeldByOther {
            holder,
            expires_at_ms,
            ..
        }) => {
            assert_eq!(holder, node("n1"));
            assert!(expires_at_ms >= lease.expires_at_ms);
        }
        other => panic!("expected HeldByOther, got {other:?}"),
    }
}

async fn acquire_by_holder_is_idempotent<B: Backend>(b: B) {
    let (m, a, n1) = (b.manager(), actor("a1"), node("n1"));
    let first = m.acquire(&a, &n1).await.unwrap();
    let again = m.acquire(&a, &n1).await.unwrap();
    assert_eq!(again.fencing_token, first.fencing_token);
    assert_eq!(again.holder, first.holder);
    assert!(again.expires_at_ms >= first.expires_at_ms);
}

async fn renew_extends_validity_and_keeps_token<B: Backend>(b: B) {
    let (m, a, n1) = (b.manager(), actor("a1"), node("n1"));
    let first = m.acquire(&a, &n1).await.unwrap();
    b.advance_ms(b.lease_duration_ms() / 2).await;
    let before_ms = b.now_ms();
    let renewed = m.renew(&a, &n1).await.unwrap();
    let after_ms = b.now_ms();
    assert_eq!(renewed.fencing_token, first.fencing_token);
    // Exactly the store's now plus the duration: not extended from the old expiry, which
    // would give the holder more than one duration from its renewal.
    let duration_ms = b.lease_duration_ms();
    assert!(
        (before_ms + duration_ms..=after_ms + duration_ms).contains(&renewed.expires_at_ms),
        "renewed to {} ms, not now ({before_ms}..={after_ms} ms) + {duration_ms} ms",
        renewed.expires_at_ms
    );
    assert!(renewed.expires_at_ms > first.expires_at_ms);
    assert_eq!(renewed.renewal_count, first.renewal_count + 1);
    // Past the original expiry but inside the renewed one, the lease still holds.
    b.advance_ms(b.lease_duration_ms() * 3 / 4).await;
    assert!(m.is_valid(&a, &n1).await.unwrap());
    assert!(m.acquire(&a, &node("n2")).await.is_err());
}

async fn non_holder_cannot_renew_or_release<B: Backend>(b: B) {
    let (m, a) = (b.manager(), actor("a1"));
    assert!(matches!(
        m.renew(&a, &node("n1")).await,
        Err(LeaseError::NotHolder { .. })
    ));
    let lease = m.acquire(&a, &node("n1")).await.unwrap();
    match m.renew(&a, &node("n2")).await {
        Err(LeaseError::NotHolder {
            holder, node_id, ..
        }) => {
            assert_eq!((holder, node_id), (Some(node("n1")), node("n2")));
        }
        other => panic!("expected NotHolder, got {other:?}"),
    }
    assert!(matches!(
        m.release(&a, &node("n2")).await,
        Err(LeaseError::NotHolder { .. })
    ));
    assert_eq!(
        m.get(&a).await.unwrap().map(|l| l.fencing_token),
        Some(lease.fencing_token)
    );
}

/// A keeper's round: each request decided on its own, as its own call would be, and answered
/// in the round's order, whether the backend carries the round whole or call by call.
async fn a_round_answers_each_request_on_its_own<B: Backend>(b: B) {
    let (m, n1, n2) = (b.manager(), node("n1"), node("n2"));
    let actors: Vec<ActorId> = (1..=5).map(|i| actor(&format!("a{i}"))).collect();
    let mut tokens = Vec::new();
    for a in &actors[..3] {
        tokens.push(m.acquire(a, &n1).await.unwrap().fencing_token);
    }
    let others = m.acquire(&actors[3], &n2).await.unwrap();
    b.advance_ms(b.lease_duration_ms() / 2).await;
    let request = |op, i: usize, fencing_token| FencedRequest {
        op,
        actor_id: actors[i].clone(),
        fencing_token,
    };
    let stale = FencingToken(tokens[1].0 + 1_000);
    let round = [
        request(FencedOp::Renew, 0, tokens[0]),
        request(FencedOp::Renew, 1, stale),
        request(FencedOp::Release, 2, tokens[2]),
        request(FencedOp::Renew, 3, others.fencing_token),
        request(FencedOp::Release, 4, FencingToken(1)),
    ];
    let before_ms = b.now_ms();
    let answers = m.fenced_round(&n1, &round).await;
    assert_eq!(answers.len(), round.len(), "{answers:?}");
    // Each answer is its own request's.
    for (request, answer) in round.iter().zip(&answers) {
        let actor_id = match answer {
            Ok(lease) => &lease.actor_id,
            Err(LeaseError::NotHolder { actor_id, .. }) => actor_id,
            Err(other) => panic!("{request:?}: {other:?}"),
        };
        assert_eq!(actor_id, &request.actor_id, "{answers:?}");
    }
    let renewed = answers[0].as_ref().expect("renewal with the held token");
    assert_eq!(renewed.fencing_token, tokens[0]);
    assert!(renewed.expires_at_ms >= before_ms + b.lease_duration_ms());
    assert_eq!(renewed.renewal_count, 1);
    for refused in [1, 3, 4] {
        assert!(
            matches!(answers[refused], Err(LeaseError::NotHolder { .. })),
            "request {refused}: {:?}",
            answers[refused]
        );
    }
    let released = answers[2].as_ref().expect("release with the held token");
    assert_eq!(released.fencing_token, tokens[2]);
    assert_eq!(m.get(&actors[2]).await.unwrap(), None);
    // The refused requests changed nothing.
    let kept = m.get(&actors[1]).await.unwrap().expect("a2 still held");
    assert_eq!((kept.fencing_token, kept.renewal_count), (tokens[1], 0));
    let untouched = m.get(&actors[3]).await.unwrap().expect("a4 still held");
    assert_eq!(
        (untouched.holder, untouched.fencing_token),
        (n2, others.fencing_token)
    );
    assert_eq!(m.get(&actors[4]).await.unwrap(), None);
    assert!(m.fenced_round(&n1, &[]).await.is_empty());
}

async fn expired_lease_cannot_be_renewed<B: Backend>(b: B) {
    let (m, a, n1) = (b.manager(), actor("a1"), node("n1"));
    m.acquire(&a, &n1).await.unwrap();
    let_lease_expire(&b, std::slice::from_ref(&a)).await;
    let err = m.renew(&a, &n1).await.unwrap_err();
    assert!(
        matches!(
            err,
            LeaseError::Expired { .. } | LeaseError::NotHolder { .. }
        ),
        "{err:?}"
    );
    assert!(!m.is_valid(&a, &n1).await.unwrap());
    assert_eq!(m.get(&a).await.unwrap(), None);
}

async fn expired_lease_is_claimable_with_larger_token<B: Backend>(b: B) {
    let (m, a) = (b.manager(), actor("a1"));
    let first = m.acquire(&a, &node("n1")).await.unwrap();
    let_lease_expire(&b, std::slice::from_ref(&a)).await;
    let second = m.acquire(&a, &node("n2")).await.unwrap();
    assert_eq!(second.holder, node("n2"));
    assert!(second.fencing_token > first.fencing_token);
    assert!(!m.is_valid(&a, &node("n1")).await.unwrap());
}

async fn release_frees_lease_and_tokens_survive_it<B: Backend>(mut b: B) {
    let (a, n1) = (actor("a1"), node("n1"));
    let first = b.manager().acquire(&a, &n1).await.unwrap();
    let released = b.manager().release(&a, &n1).await.unwrap();
    assert_eq!(released.fencing_token, first.fencing_token);
    b.reopen().await;
    let m = b.manager();
    assert_eq!(m.get(&a).await.unwrap(), None);
    assert!(matches!(
        m.release(&a, &n1).await,
        Err(LeaseError::NotHolder { .. })
    ));
    let again = m.acquire(&a, &n1).await.unwrap();
    assert!(
        again.fencing_token > first.fencing_token,
        "a token is never reissued"
    );
}

async fn tokens_increase_across_many_holders<B: Backend>(mut b: B) {
    let a = actor("a1");
    let mut last = FencingToken::ZERO;
    for round in 0..6 {
        // Tokens keep increasing across restarts of the store's clients too.
        b.reopen().await;
        let m = b.manager();
        let holder = node(&format!("n{}", round % 3));
        let lease = m.acquire(&a, &holder).await.unwrap();
        assert!(
            lease.fencing_token > last,
            "round {round}: {} <= {last}",
            lease.fencing_token
        );
        last = lease.fencing_token;
        if round % 2 == 0 {
            m.release(&a, &holder).await.unwrap();
        } else {
            let_lease_expire(&b, std::slice::from_ref(&a)).await;
        }
    }
}

async fn leases_held_by_lists_only_valid_leases_of_that_node<B: Backend>(b: B) {
    let m = b.manager();
    let (n1, n2) = (node("n1"), node("n2"));
    for name in ["b", "a", "c"] {
        m.acquire(&actor(name), &n1).await.unwrap();
    }
    m.acquire(&actor("d"), &n2).await.unwrap();
    m.release(&actor("c"), &n1).await.unwrap();
    let held: Vec<_> = m
        .leases_held_by(&n1)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.actor_id)
        .collect();
    assert_eq!(held, vec![actor("a"), actor("b")]);
    let_lease_expire(&b, &[actor("a"), actor("b"), actor("d")]).await;
    assert!(m.leases_held_by(&n1).await.unwrap().is_empty());
}

async fn concurrent_acquires_have_exactly_one_winner<B: Backend>(b: B) {
    let (m, a) = (b.manager(), actor("contended"));
    let nodes: Vec<NodeId> = (0..8).map(|i| node(&format!("n{i}"))).collect();
    let attempts = nodes.iter().map(|n| m.acquire(&a, n));
    let results = futures::future::join_all(attempts).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for result in &results {
        if let Err(err) = result {
            assert!(matches!(err, LeaseError::HeldByOther { .. }), "{err:?}");
        }
    }
    assert_eq!(
        m.get(&a).await.unwrap().map(|l| l.holder),
        Some(winners[0].holder.clone())
    );
}

/// Actor state follows the lease: a holder fences the state with its token and writes; its
/// successor's fence reads that write, and from then on the old token is refused, also after
/// the stores are reopened. Token zero and oversized values are refused everywhere.
async fn fenced_state_follows_the_lease(mut backend: impl Backend) {
    let a = actor("a");
    let (n1, n2) = (node("n1"), node("n2"));
    let first = backend.manager().acquire(&a, &n1).await.unwrap();
    let t1 = first.fencing_token;
    let fenced = backend.state().fence(&a, t1).await.unwrap();
    assert_eq!((fenced.highest_token, fenced.value), (t1, None));
    backend.state().write(&a, t1, b"first").await.unwrap();
    let read = backend.state().read(&a).await.unwrap().unwrap();
    assert_eq!(
        (read.highest_token, read.value.as_deref()),
        (t1, Some(&b"first"[..]))
    );

    backend.manager().release(&a, &n1).await.unwrap();
    let t2 = backend
        .manager()
        .acquire(&a, &n2)
        .await
        .unwrap()
        .fencing_token;
    assert!(t2 > t1);
    let fenced = backend.state().fence(&a, t2).await.unwrap();
    assert_eq!(fenced.highest_token, t2);
    assert_eq!(
        fenced.value.as_deref(),
        Some(&b"first"[..]),
        "the successor reads it"
    );
    let late = backend.state().write(&a, t1, b"late").await.unwrap_err();
    assert!(
        matches!(late, StateError::StaleToken { highest_token, .. } if highest_token == t2),
        "{late:?}"
    );
    backend.state().write(&a, t2, b"second").await.unwrap();

    backend.reopen().await;
    let read = backend.state().read(&a).await.unwrap().unwrap();
    assert_eq!(
        (read.highest_token, read.value.as_deref()),
        (t2, Some(&b"second"[..]))
    );
    let late = backend.state().write(&a, t1, b"late").await.unwrap_err();
    assert!(matches!(late, StateError::StaleToken { .. }), "{late:?}");
    let zero = backend.state().write(&a, FencingToken::ZERO, b"x").await;
    assert!(
        matches!(zero, Err(StateError::ZeroToken { .. })),
        "{zero:?}"
    );
    let huge = vec![0u8; STATE_VALUE_BYTES_MAX + 1];
    let too_large = backend.state().write(&a, t2, &huge).await;
    assert!(
        matches!(too_large, Err(StateError::ValueTooLarge { .. })),
        "{too_large:?}"
    );
    let read = backend.state().read(&a).await.unwrap().unwrap();
    assert_eq!(
        read.value.as_deref(),
        Some(&b"second"[..]),
        "nothing refused was written"
    );
}

/// Generates one `#[tokio::test]` per suite case for a backend.
macro_rules! conformance_suite {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;
            conformance_suite!(@cases $make;
                acquire_free_lease_grants_first_token,
                acquire_held_lease_names_holder_and_expiry,
                acquire_by_holder_is_idempotent,
                renew_extends_validity_and_keeps_token,
                non_holder_cannot_renew_or_release,
                a_round_answers_each_request_on_its_own,
                expired_lease_cannot_be_renewed,
                expired_lease_is_claimable_with_larger_token,
                release_frees_lease_and_tokens_survive_it,
                tokens_increase_across_many_holders,
                leases_held_by_lists_only_valid_leases_of_that_node,
                concurrent_acquires_have_exactly_one_winner,
                fenced_state_follows_the_lease);
        }
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                if let Some(backend) = $make.await {
                    super::$case(backend).await;
                }
            }
        )*
    };
}

struct MemoryBackend<M = MemoryLeaseManager> {
    clock: ManualClock,
    manager: M,
    state: MemoryFencedStateStore,
}

impl<M: LeaseManager> Backend for MemoryBackend<M> {
    type Manager = M;
    type State = MemoryFencedStateStore;

    fn manager(&self) -> &M {
        &self.manager
    }

    fn state(&self) -> &MemoryFencedStateStore {
        &self.state
    }

    async fn advance_ms(&self, duration_ms: u64) {
        self.clock.advance_ms(duration_ms);
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    async fn reopen(&mut self) {}
}

async fn memory_backend() -> Option<MemoryBackend> {
    let clock = ManualClock::new(1_000);
    let config = LeaseConfig::new(LEASE_DURATION_MS).unwrap();
    let manager = MemoryLeaseManager::in_memory(Arc::new(clock.clone()), config);
    Some(MemoryBackend {
        clock,
        manager,
        state: MemoryFencedStateStore::new(),
    })
}

conformance_suite!(memory, memory_backend());

/// A manager that overrides none of the trait's provided methods but the fenced calls (which
/// must be atomic): what a backend written without rounds gets, `fenced_round` calling
/// `renew_fenced` and `release_fenced` for each request.
struct CallByCall(MemoryLeaseManager);

impl LeaseManager for CallByCall {
    fn lease_duration_ms(&self) -> u64 {
        self.0.lease_duration_ms()
    }

    async fn acquire(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.0.acquire(actor_id, node_id).await
    }

    async fn renew(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.0.renew(actor_id, node_id).await
    }

    async fn release(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.0.release(actor_id, node_id).await
    }

    async fn renew_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        self.0.renew_fenced(actor_id, node_id, fencing_token).await
    }

    async fn release_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        self.0
            .release_fenced(actor_id, node_id, fencing_token)
            .await
    }

    async fn is_valid(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<bool, LeaseError> {
        self.0.is_valid(actor_id, node_id).await
    }

    async fn get(&self, actor_id: &ActorId) -> Result<Option<Lease>, LeaseError> {
        self.0.get(actor_id).await
    }

    async fn leases_held_by(&self, node_id: &NodeId) -> Result<Vec<Lease>, LeaseError> {
        self.0.leases_held_by(node_id).await
    }
}

async fn call_by_call_backend() -> Option<MemoryBackend<CallByCall>> {
    let MemoryBackend {
        clock,
        manager,
        state,
    } = memory_backend().await?;
    Some(MemoryBackend {
        clock,
        manager: CallByCall(manager),
        state,
    })
}

conformance_suite!(memory_call_by_call, call_by_call_backend());

/// The SQLite store in a fresh temporary directory, timed by a manual clock so that
/// `advance_ms` moves store time without waiting.
struct SqliteBackend {
    clock: ManualClock,
    /// Always `Some` between calls; empty only while reopening.
    manager: Option<SqliteLeaseManager>,
    /// Likewise.
    state: Option<SqliteFencedStateStore>,
    path: std::path::PathBuf,
    state_path: std::path::PathBuf,
    // Declared last so the store (and its writer thread) is dropped before the directory.
    _dir: tempfile::TempDir,
}

impl Backend for SqliteBackend {
    type Manager = SqliteLeaseManager;
    type State = SqliteFencedStateStore;

    fn manager(&self) -> &SqliteLeaseManager {
        self.manager.as_ref().expect("open between calls")
    }

    fn state(&self) -> &SqliteFencedStateStore {
        self.state.as_ref().expect("open between calls")
    }

    async fn advance_ms(&self, duration_ms: u64) {
        self.clock.advance_ms(duration_ms);
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// A new store over the same file, after the old one (and its writer thread) is gone.
    async fn reopen(&mut self) {
        drop(self.manager.take());
        drop(self.state.take());
        self.manager = Some(sqlite_manager(&self.path, &self.clock));
        self.state = Some(SqliteFencedStateStore::open(&self.state_path).unwrap());
    }
}

fn sqlite_manager(path: &std::path::Path, clock: &ManualClock) -> SqliteLeaseManager {
    let options = SqliteOptions::default().with_clock(Arc::new(clock.clone()));
    let store = SqliteLeaseStore::open_with(path, options).unwrap();
    SqliteLeaseManager::new(store, LeaseConfig::new(LEASE_DURATION_MS).unwrap())
}

async fn sqlite_backend() -> Option<SqliteBackend> {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let path = dir.path().join("leases.db");
    let state_path = dir.path().join("state.db");
    Some(SqliteBackend {
        manager: Some(sqlite_manager(&path, &clock)),
        state: Some(SqliteFencedStateStore::open(&state_path).unwrap()),
        clock,
        path,
        state_path,
        _dir: dir,
    })
}

conformance_suite!(sqlite, sqlite_backend());

#[cfg(feature = "etcd")]
/// etcd at the endpoints in `KELPIE_ETCD_ENDPOINTS` (`scripts/with-etcd` starts one), under a
/// key prefix of its own so that cases run in parallel. Time really passes: etcd decides expiry
/// with its own lease TTLs, so the suite must wait for them.
struct EtcdBackend {
    manager: EtcdLeaseManager,
    /// The manager's fenced state store (replaced with it on reopen).
    state: kelpie_lease::EtcdFencedStateStore,
    /// How to connect again, with the same key prefix and clock.
    options: EtcdOptions,
    clock: kelpie_core::SharedClock,
    /// Managers replaced by [`Backend::reopen`]: kept so that their sessions (and the leases
    /// hanging off them) live on, as another process's would.
    previous: Vec<EtcdLeaseManager>,
}

#[cfg(feature = "etcd")]
/// How long after a lease's TTL ran out etcd must have deleted its key: twenty of its expiry
/// checks ([`ETCD_EXPIRY_CHECK_INTERVAL_MS`]), where it usually takes one or two.
const ETCD_EXPIRED_DELETED_WITHIN_MS: u64 = 20 * ETCD_EXPIRY_CHECK_INTERVAL_MS;

#[cfg(feature = "etcd")]
/// etcd counts TTLs in whole seconds and raises shorter ones to its minimum, which is 2 s under
/// etcd's default heartbeat and election timeout.
const ETCD_LEASE_DURATION_MS: u64 = 2_000;

#[cfg(feature = "etcd")]
impl Backend for EtcdBackend {
    type Manager = EtcdLeaseManager;
    type State = kelpie_lease::EtcdFencedStateStore;

    fn manager(&self) -> &EtcdLeaseManager {
        &self.manager
    }

    fn state(&self) -> &kelpie_lease::EtcdFencedStateStore {
        &self.state
    }

    // etcd expires leases on its leader's clock, so letting time pass means waiting for real.
    // This backend never runs inside the simulator.
    #[allow(clippy::disallowed_methods)]
    async fn advance_ms(&self, duration_ms: u64) {
        tokio::time::sleep(Duration::from_millis(duration_ms)).await;
    }

    fn lease_duration_ms(&self) -> u64 {
        ETCD_LEASE_DURATION_MS
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// A new client with the same key prefix.
    async fn reopen(&mut self) {
        let manager = EtcdLeaseManager::connect(self.options.clone())
            .await
            .expect("etcd answered a moment ago");
        self.state = manager.fenced_state_store();
        self.previous
            .push(std::mem::replace(&mut self.manager, manager));
    }

    /// etcd deletes expired leases from a loop that runs every
    /// [`ETCD_EXPIRY_CHECK_INTERVAL_MS`], through a raft proposal: on a quiet host within
    /// about twice the interval (what this suite once waited, fixed), on a loaded one later
    /// (a CI run found a key still there after that). So each key's deletion is watched for,
    /// up to [`ETCD_EXPIRED_DELETED_WITHIN_MS`].
    async fn await_expired(&self, actors: &[ActorId]) {
        for actor_id in actors {
            let deleted = (self.manager)
                .wait_until_free(actor_id, ETCD_EXPIRED_DELETED_WITHIN_MS)
                .await
                .expect("etcd answers the watch");
            assert!(
                deleted,
                "etcd still holds {actor_id} {ETCD_EXPIRED_DELETED_WITHIN_MS} ms after its \
                 lease's TTL ran out"
            );
        }
    }
}

#[cfg(feature = "etcd")]
async fn etcd_backend() -> Option<EtcdBackend> {
    let Some(options) = EtcdOptions::from_env().expect("KELPIE_ETCD_ENDPOINTS is malformed") else {
        kelpie_core::testing::missing_requirement(
            "etcd conformance",
            "KELPIE_ETCD_ENDPOINTS not set",
            "run it under scripts/with-etcd",
        );
        return None;
    };
    static CASES: AtomicU64 = AtomicU64::new(0);
    let prefix = format!(
        "/kelpie-conformance/{}-{}-{}/",
        run_stamp_ms(),
        std::process::id(),
        CASES.fetch_add(1, Ordering::SeqCst)
    );
    let lease = LeaseConfig::new(ETCD_LEASE_DURATION_MS).unwrap();
    let clock: kelpie_core::SharedClock = Arc::new(kelpie_core::TokioClock::new());
    let options = options
        .with_key_prefix(prefix)
        .with_lease_config(lease)
        .with_clock(Arc::clone(&clock));
    let manager = EtcdLeaseManager::connect(options.clone())
        .await
        .expect("KELPIE_ETCD_ENDPOINTS is set but etcd cannot be used");
    Some(EtcdBackend {
        state: manager.fenced_state_store(),
        manager,
        options,
        clock,
        previous: Vec::new(),
    })
}

#[cfg(feature = "etcd")]
/// Wall-clock ms, so that key prefixes differ between runs even if a process id repeats.
#[allow(clippy::disallowed_methods)]
fn run_stamp_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[cfg(feature = "etcd")]
conformance_suite!(etcd, etcd_backend());
