//! Races of a session on a multi-threaded runtime, as `kelpie node` runs one: acquires,
//! releases, drops and shutdowns of the same actors on several threads at once, which the
//! simulator's one thread never interleaves. Each scenario runs over three managers: the
//! memory store (its operations never yield), the memory store behind a wrapper that yields
//! around each operation (as any real store does), and SQLite (its writer thread answers over
//! a channel). Each failed without the tokened releases of the session (race 1: up to 500 of
//! 500 guards killed; race 2: 8 of 20 runs; race 3: every run) or the keeper's release of a
//! grant it disowned (race 6: 9 of 20 runs on the yielding store), and race 4's churn of three
//! tasks per actor still killed a guard in about one run in twenty until the keeper counted
//! that release as begun (0 in 55 runs since).

// Real threads on the real clock: the interleavings under test need both.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kelpie_core::{ActorId, FencingToken, NodeId, SharedClock, TokioClock};
use kelpie_lease::backend::Decision;
use kelpie_lease::backend::{
    LeaseRequest, LeaseStore, MemoryLeaseStore, ProtocolLeaseManager, RecordSnapshot, StoreSnapshot,
};
use kelpie_lease::{
    Lease, LeaseConfig, LeaseError, LeaseGuard, LeaseManager, LeaseSession, MemoryLeaseManager,
    SessionConfig, SessionError, SqliteLeaseManager, StoreError,
};

const LEASE_MS: u64 = 100_000;

/// The memory store, yielding to the runtime before and after each step.
struct Yielding(MemoryLeaseStore);

impl LeaseStore for Yielding {
    async fn apply(&self, a: &ActorId, r: &LeaseRequest) -> Result<Decision, StoreError> {
        tokio::task::yield_now().await;
        let d = self.0.apply(a, r).await;
        tokio::task::yield_now().await;
        d
    }
    async fn apply_reply(
        &self,
        a: &ActorId,
        r: &LeaseRequest,
    ) -> Result<Result<Lease, LeaseError>, StoreError> {
        tokio::task::yield_now().await;
        let d = self.0.apply_reply(a, r).await;
        tokio::task::yield_now().await;
        d
    }
    async fn load(&self, a: &ActorId) -> Result<RecordSnapshot, StoreError> {
        self.0.load(a).await
    }
    async fn scan(&self) -> Result<StoreSnapshot, StoreError> {
        self.0.scan().await
    }
}

fn clock() -> SharedClock {
    Arc::new(TokioClock::new())
}

fn memory() -> Arc<MemoryLeaseManager> {
    Arc::new(MemoryLeaseManager::in_memory(
        clock(),
        LeaseConfig::new(LEASE_MS).unwrap(),
    ))
}

fn yielding() -> Arc<ProtocolLeaseManager<Yielding>> {
    let store = Yielding(MemoryLeaseStore::new(clock()));
    Arc::new(ProtocolLeaseManager::new(
        store,
        LeaseConfig::new(LEASE_MS).unwrap(),
    ))
}

fn sqlite() -> (Arc<SqliteLeaseManager>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let m = SqliteLeaseManager::open(path, LeaseConfig::new(LEASE_MS).unwrap()).unwrap();
    (Arc::new(m), dir)
}

fn start<M: LeaseManager + 'static>(manager: &Arc<M>) -> LeaseSession<M> {
    let node = NodeId::new("n").unwrap();
    LeaseSession::start(Arc::clone(manager), node, SessionConfig::default()).unwrap()
}

fn actor(name: String) -> ActorId {
    ActorId::new(name).unwrap()
}

macro_rules! over_managers {
    ($scenario:ident: $mem:ident, $yld:ident, $sql:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $mem() {
            $scenario(memory()).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $yld() {
            $scenario(yielding()).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sql() {
            let (m, _dir) = sqlite();
            $scenario(m).await;
        }
    };
}

#[derive(Default, Debug)]
struct Anomalies {
    /// A guard we still hold (long lease, healthy store) stopped being valid.
    killed: AtomicUsize,
    /// acquire failed with NotHolder (a release raced inside acquire_unguarded_token).
    not_holder: AtomicUsize,
    expired: AtomicUsize,
    other: AtomicUsize,
}

/// Acquires, retrying "release still in flight" (documented, retry later); counts other odd
/// errors. Returns None on AlreadyGuarded.
async fn acquire_retry<M: LeaseManager + 'static>(
    s: &LeaseSession<M>,
    a: &ActorId,
    anomalies: &Anomalies,
) -> Option<LeaseGuard> {
    for _ in 0..10_000 {
        match s.acquire(a).await {
            Ok(g) => return Some(g),
            Err(SessionError::AlreadyGuarded { .. }) => return None,
            Err(SessionError::Lease(LeaseError::Store(StoreError::Unavailable { .. }))) => {}
            Err(SessionError::Lease(LeaseError::NotHolder { .. })) => {
                anomalies.not_holder.fetch_add(1, Ordering::Relaxed);
            }
            Err(SessionError::Lease(LeaseError::Expired { .. })) => {
                anomalies.expired.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("other error {e:?}");
                anomalies.other.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    panic!("never acquired {a}");
}

/// Leases of the session's holder still held at the store, on `actors`.
async fn held_at_store<M: LeaseManager + 'static>(
    m: &M,
    s: &LeaseSession<M>,
    actors: &[ActorId],
) -> Vec<ActorId> {
    let mut held = Vec::new();
    for a in actors {
        if let Some(lease) = m.get(a).await.unwrap() {
            if &lease.holder == s.holder_id() {
                held.push(a.clone());
            }
        }
    }
    held
}

/// Race 1: two acquires of one actor at once in one session. The loser's store answer is
/// idempotent (the winner's token, already in guarded_max), so acquire_unguarded_token
/// releases the lease (the winner's, live) and acquires a new token, then finds the winner's
/// guard and returns AlreadyGuarded: the winner's guard is dead and the new lease is believed
/// and renewed with no guard (leaked until shutdown).
async fn race1_two_acquires<M: LeaseManager + 'static>(manager: Arc<M>) {
    const ACTORS: usize = 500;
    let session = start(&manager);
    let actors: Vec<ActorId> = (0..ACTORS).map(|i| actor(format!("a{i}"))).collect();
    let mut tasks = Vec::new();
    for a in &actors {
        for _ in 0..2 {
            let (s, a) = (session.clone(), a.clone());
            tasks.push(tokio::spawn(
                async move { (a.clone(), s.acquire(&a).await) },
            ));
        }
    }
    let mut winners: BTreeMap<ActorId, Vec<LeaseGuard>> = BTreeMap::new();
    for t in tasks {
        let (a, r) = t.await.unwrap();
        if let Ok(g) = r {
            winners.entry(a).or_default().push(g);
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let double = winners
        .values()
        .filter(|w| w.iter().filter(|g| g.is_valid()).count() > 1)
        .count();
    let both_ok = winners.values().filter(|w| w.len() > 1).count();
    let none = ACTORS - winners.len();
    let mut killed = Vec::new();
    for (a, gs) in &winners {
        for g in gs {
            let belief = session.keeper().belief(a).map(|b| b.fencing_token);
            if !g.is_valid() || belief != Some(g.fencing_token()) {
                killed.push((a.clone(), g.fencing_token(), belief));
            }
        }
    }
    drop(winners);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let leaked = held_at_store(&*manager, &session, &actors).await;
    eprintln!(
        "valid_doubles={double} both_ok={both_ok} none={none} killed={} leaked={} first killed={:?}",
        killed.len(),
        leaked.len(),
        killed.first()
    );
    session.shutdown().await;
    assert_eq!(double, 0, "two valid guards for one actor");
    assert!(
        killed.is_empty() && leaked.is_empty(),
        "{} winners' guards dead (guard token, belief token) e.g. {:?}; {} leases held with \
         no guard after every guard was dropped, e.g. {:?}",
        killed.len(),
        &killed[..killed.len().min(3)],
        leaked.len(),
        &leaked[..leaked.len().min(3)]
    );
}

/// Race 2: a guard dropped and acquired again at once (another thread runs the driver). The
/// driver's dropped_to_release checks `keeper.holds(a) == old token`, then releases by actor
/// (no token) when its future is first polled; the new acquire in between (idempotent old
/// token, release, new token) has its new lease released by the driver.
async fn race2_drop_reacquire<M: LeaseManager + 'static>(manager: Arc<M>) {
    const TASKS: usize = 40;
    const ROUNDS: usize = 100;
    let session = start(&manager);
    let anomalies = Arc::new(Anomalies::default());
    let actors: Vec<ActorId> = (0..TASKS).map(|i| actor(format!("d{i}"))).collect();
    let tasks: Vec<_> = actors
        .iter()
        .map(|a| {
            let (s, a, an) = (session.clone(), a.clone(), Arc::clone(&anomalies));
            tokio::spawn(async move {
                let mut last = FencingToken::ZERO;
                for _ in 0..ROUNDS {
                    let g = acquire_retry(&s, &a, &an)
                        .await
                        .expect("one task per actor");
                    assert!(g.fencing_token() > last, "tokens must rise");
                    last = g.fencing_token();
                    drop(g);
                    let g2 = acquire_retry(&s, &a, &an)
                        .await
                        .expect("one task per actor");
                    assert!(g2.fencing_token() > last, "tokens must rise");
                    last = g2.fencing_token();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    if !g2.is_valid() {
                        an.killed.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(g2);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let leaked = held_at_store(&*manager, &session, &actors).await;
    eprintln!("{anomalies:?} leaked={}", leaked.len());
    session.shutdown().await;
    assert_eq!(anomalies.killed.load(Ordering::Relaxed), 0, "{anomalies:?}");
    assert_eq!(
        anomalies.not_holder.load(Ordering::Relaxed),
        0,
        "{anomalies:?}"
    );
    assert!(leaked.is_empty(), "leaked {leaked:?}");
}

/// Race 3 (no concurrency needed, but what a runtime does when a cancelled task cleans up
/// while another task re-activated the actor): `LeaseSession::release` of a stale guard
/// (cancelled; its entry already gone) calls `keeper.release(actor)`, which releases
/// whatever the keeper believes: the current guard's lease.
async fn race3_stale_release<M: LeaseManager + 'static>(manager: Arc<M>) {
    let session = start(&manager);
    let anomalies = Anomalies::default();
    let a = actor("s".into());
    let old = session.acquire(&a).await.unwrap();
    // The guard's work was told to stop (as the driver does when the belief nears its end).
    old.cancellation().cancel();
    let current = acquire_retry(&session, &a, &anomalies).await.unwrap();
    assert!(current.fencing_token() > old.fencing_token());
    let released = session.release(old).await;
    eprintln!("release of the stale guard answered {released:?}");
    let stored = manager.get(&a).await.unwrap();
    assert!(
        current.is_valid(),
        "the current guard {:?} was killed by releasing the stale one; store: {stored:?}",
        current.fencing_token()
    );
    session.shutdown().await;
}

/// Race 4: two tasks churn on the same actors (acquire, hold a moment, release or drop).
/// Invariants: never two valid guards for one actor; a guard held stays valid; tokens rise;
/// nothing held at the store once all guards are gone.
async fn race4_churn<M: LeaseManager + 'static>(manager: Arc<M>) {
    const ACTORS: usize = 20;
    const TASKS_PER_ACTOR: usize = 3;
    const ROUNDS: usize = 60;
    let session = start(&manager);
    let anomalies = Arc::new(Anomalies::default());
    let doubles = Arc::new(AtomicUsize::new(0));
    let actors: Vec<ActorId> = (0..ACTORS).map(|i| actor(format!("c{i}"))).collect();
    // Per actor: the guards currently held by the tasks (token, cancellation), and the last
    // token handed out.
    type Held = Arc<Mutex<BTreeMap<ActorId, (Vec<Arc<LeaseGuard>>, FencingToken)>>>;
    let held: Held = Arc::default();
    let mut tasks = Vec::new();
    for (n, a) in actors.iter().enumerate() {
        for k in 0..TASKS_PER_ACTOR {
            let (s, a, an, held, doubles) = (
                session.clone(),
                a.clone(),
                Arc::clone(&anomalies),
                Arc::clone(&held),
                Arc::clone(&doubles),
            );
            tasks.push(tokio::spawn(async move {
                for round in 0..ROUNDS {
                    let Some(g) = acquire_retry(&s, &a, &an).await else {
                        tokio::time::sleep(Duration::from_micros(300)).await;
                        continue;
                    };
                    let g = Arc::new(g);
                    {
                        let mut h = held.lock().unwrap();
                        let (list, last) = h
                            .entry(a.clone())
                            .or_insert_with(|| (Vec::new(), FencingToken::ZERO));
                        assert!(g.fencing_token() > *last, "tokens must rise");
                        *last = g.fencing_token();
                        if list.iter().any(|o| o.is_valid()) && g.is_valid() {
                            doubles.fetch_add(1, Ordering::Relaxed);
                        }
                        list.push(Arc::clone(&g));
                    }
                    tokio::time::sleep(Duration::from_micros(500)).await;
                    if !g.is_valid() {
                        an.killed.fetch_add(1, Ordering::Relaxed);
                    }
                    {
                        let mut h = held.lock().unwrap();
                        h.get_mut(&a).unwrap().0.retain(|o| !Arc::ptr_eq(o, &g));
                    }
                    let g = Arc::into_inner(g).unwrap();
                    if (n + k + round) % 2 == 0 {
                        let _ = s.release(g).await;
                    } else {
                        drop(g);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let leaked = held_at_store(&*manager, &session, &actors).await;
    let report = session.shutdown().await;
    let after = held_at_store(&*manager, &session, &actors).await;
    eprintln!(
        "{anomalies:?} doubles={} leaked={} shutdown={report:?} after_shutdown={}",
        doubles.load(Ordering::Relaxed),
        leaked.len(),
        after.len()
    );
    assert_eq!(
        doubles.load(Ordering::Relaxed),
        0,
        "two valid guards at once"
    );
    assert_eq!(anomalies.killed.load(Ordering::Relaxed), 0, "{anomalies:?}");
    assert!(leaked.is_empty(), "leaked {leaked:?}");
    assert!(after.is_empty(), "left held after shutdown {after:?}");
}

/// Race 5: shutdown while tasks acquire, release and drop. Afterwards nothing of the session
/// is held at the store and no guard is valid.
async fn race5_shutdown<M: LeaseManager + 'static>(manager: Arc<M>) {
    const ACTORS: usize = 200;
    let session = start(&manager);
    let actors: Vec<ActorId> = (0..ACTORS).map(|i| actor(format!("x{i}"))).collect();
    let kept = Arc::new(Mutex::new(Vec::<LeaseGuard>::new()));
    let mut tasks = Vec::new();
    for (i, a) in actors.iter().enumerate() {
        let (s, a, kept) = (session.clone(), a.clone(), Arc::clone(&kept));
        tasks.push(tokio::spawn(async move {
            for round in 0.. {
                match s.acquire(&a).await {
                    Ok(g) => match (i + round) % 3 {
                        0 => drop(g),
                        1 => {
                            let _ = s.release(g).await;
                        }
                        _ => kept.lock().unwrap().push(g),
                    },
                    Err(SessionError::ShuttingDown) => return,
                    Err(_) => {}
                }
                tokio::task::yield_now().await;
                if round > 50 {
                    // Keep running until the shutdown refuses.
                    tokio::time::sleep(Duration::from_micros(100)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = session.shutdown().await;
    for t in tasks {
        t.await.unwrap();
    }
    let valid = kept.lock().unwrap().iter().filter(|g| g.is_valid()).count();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = held_at_store(&*manager, &session, &actors).await;
    let beliefs = session.keeper().beliefs().len();
    eprintln!(
        "shutdown={report:?} valid_after={valid} held_after={} beliefs_after={beliefs}",
        after.len()
    );
    assert_eq!(valid, 0);
    assert!(after.is_empty(), "held after shutdown: {after:?}");
}

over_managers!(race1_two_acquires: race1_memory, race1_yielding, race1_sqlite);

over_managers!(race2_drop_reacquire: race2_memory, race2_yielding, race2_sqlite);

over_managers!(race3_stale_release: race3_memory, race3_yielding, race3_sqlite);

over_managers!(race4_churn: race4_memory, race4_yielding, race4_sqlite);

over_managers!(race5_shutdown: race5_memory, race5_yielding, race5_sqlite);

/// Race 6: a guard dropped, then one acquire at once (no retry). If the driver's release of
/// the dropped guard begins while the acquire is in flight, the keeper does not believe the
/// grant (the store may apply the release first, then grant a new token): the acquire fails,
/// and the store may keep the new grant, renewed by nobody, until it expires.
async fn race6_one_shot_reacquire<M: LeaseManager + 'static>(manager: Arc<M>) {
    const ACTORS: usize = 300;
    let session = start(&manager);
    let actors: Vec<ActorId> = (0..ACTORS).map(|i| actor(format!("o{i}"))).collect();
    let mut guards = Vec::new();
    for a in &actors {
        guards.push(session.acquire(a).await.unwrap());
    }
    let tasks: Vec<_> = guards
        .into_iter()
        .map(|g| {
            let s = session.clone();
            tokio::spawn(async move {
                let a = g.actor_id().clone();
                drop(g);
                tokio::task::yield_now().await;
                (a.clone(), s.acquire(&a).await)
            })
        })
        .collect();
    let mut failed = Vec::new();
    let mut kept = Vec::new();
    for t in tasks {
        let (a, r) = t.await.unwrap();
        match r {
            Ok(g) => kept.push(g),
            Err(e) => failed.push((a, e)),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failed_actors: Vec<ActorId> = failed.iter().map(|(a, _)| a.clone()).collect();
    let leaked = held_at_store(&*manager, &session, &failed_actors).await;
    let beliefs: Vec<ActorId> = session
        .keeper()
        .beliefs()
        .into_iter()
        .map(|(a, _)| a)
        .filter(|a| failed_actors.contains(a))
        .collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (_, e) in &failed {
        let k = format!("{e:?}");
        *kinds
            .entry(
                k[..k
                    .find(['{', '('])
                    .map_or(k.len(), |i| (i + 20).min(k.len()))]
                    .to_string(),
            )
            .or_default() += 1;
    }
    eprintln!(
        "failed={} kinds={kinds:?} held_at_store_without_guard={} believed_without_guard={}",
        failed.len(),
        leaked.len(),
        beliefs.len()
    );
    session.shutdown().await;
    assert!(
        leaked.is_empty(),
        "leases held at the store, unguarded: {:?}",
        &leaked[..leaked.len().min(3)]
    );
}

over_managers!(race6_one_shot_reacquire: race6_memory, race6_yielding, race6_sqlite);
