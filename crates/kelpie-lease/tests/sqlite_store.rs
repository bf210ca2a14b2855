//! The SQLite store's own behaviour beyond the shared conformance suite: durability across
//! reopening, a store clock that never goes backwards, group commit, handles sharing a file,
//! and damage found in rows.

use std::path::Path;
use std::sync::Arc;

use kelpie_core::{ActorId, FencingToken, ManualClock, NodeId};
use kelpie_lease::{
    backend::LeaseOp, backend::LeaseRequest, backend::LeaseStore, backend::SqliteLeaseStore,
    LeaseConfig, LeaseError, LeaseManager, SqliteLeaseManager, SqliteOptions, StoreError,
};
use rusqlite::Connection;

const LEASE_DURATION_MS: u64 = 1_000;

fn actor(name: &str) -> ActorId {
    ActorId::new(name).unwrap()
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn manager(path: &Path, clock: &ManualClock, group_commit: bool) -> SqliteLeaseManager {
    let options = SqliteOptions::default()
        .with_clock(Arc::new(clock.clone()))
        .with_group_commit(group_commit);
    let store = SqliteLeaseStore::open_with(path, options).unwrap();
    SqliteLeaseManager::new(store, LeaseConfig::new(LEASE_DURATION_MS).unwrap())
}

#[tokio::test]
async fn leases_and_tokens_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let clock = ManualClock::new(10_000);
    let first = {
        let m = manager(&path, &clock, true);
        let first = m.acquire(&actor("a"), &node("n1")).await.unwrap();
        m.release(&actor("a"), &node("n1")).await.unwrap();
        m.acquire(&actor("b"), &node("n2")).await.unwrap();
        first
    };
    let m = manager(&path, &clock, true);
    assert_eq!(
        m.get(&actor("a")).await.unwrap(),
        None,
        "the release persisted"
    );
    assert_eq!(
        m.get(&actor("b")).await.unwrap().unwrap().holder,
        node("n2")
    );
    let again = m.acquire(&actor("a"), &node("n3")).await.unwrap();
    assert!(
        again.fencing_token > first.fencing_token,
        "a token is never reissued"
    );
}

#[tokio::test]
async fn store_time_never_goes_backwards_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let lease = {
        let m = manager(&path, &ManualClock::new(50_000), true);
        m.acquire(&actor("a"), &node("n1")).await.unwrap()
    };
    // The next process's clock reads far earlier (a reset clock, another clock source). Were
    // store time to follow it, n1's lease would last 49 s longer than it was granted for, and
    // nobody else could take it in that time.
    let clock = ManualClock::new(1_000);
    let m = manager(&path, &clock, true);
    let snapshot = m.store().load(&actor("a")).await.unwrap();
    assert!(snapshot.store_now_ms >= 50_000, "{}", snapshot.store_now_ms);
    clock.advance_ms(LEASE_DURATION_MS);
    assert!(
        m.get(&actor("a")).await.unwrap().is_some(),
        "store time stays at the high-water mark until the clock passes it"
    );
    clock.advance_ms(lease.expires_at_ms);
    let taken = m.acquire(&actor("a"), &node("n2")).await.unwrap();
    assert!(taken.acquired_at_ms >= lease.expires_at_ms);
}

#[tokio::test]
async fn store_time_is_shared_between_handles_on_one_file() {
    // Two handles (as two processes) whose clocks disagree: the one behind adopts the time the
    // other persisted, so it cannot see a lease the other granted as lasting longer.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let ahead = manager(&path, &ManualClock::new(80_000), true);
    let behind = manager(&path, &ManualClock::new(2_000), true);
    let lease = ahead.acquire(&actor("a"), &node("n1")).await.unwrap();
    let snapshot = behind.store().load(&actor("a")).await.unwrap();
    assert!(
        snapshot.store_now_ms >= lease.acquired_at_ms,
        "{snapshot:?}"
    );
    let renewed = behind.renew(&actor("a"), &node("n1")).await.unwrap();
    assert!(renewed.expires_at_ms >= lease.expires_at_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(manager(
        &dir.path().join("leases.db"),
        &ManualClock::new(0),
        true,
    ));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let m = Arc::clone(&m);
            tokio::spawn(async move {
                let (a, n) = (actor(&format!("a{i}")), node(&format!("n{i}")));
                for _ in 0..10 {
                    m.acquire(&a, &n).await.unwrap();
                    m.renew(&a, &n).await.unwrap();
                    m.release(&a, &n).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = m.store().stats();
    assert_eq!(stats.operations_committed, 64 * 30);
    println!("group commit: {stats:?}");
    assert!(
        stats.transactions_committed * 4 <= stats.operations_committed,
        "64 concurrent callers should average several operations per commit: {stats:?}"
    );
    for i in 0..64 {
        let snapshot = m.store().load(&actor(&format!("a{i}"))).await.unwrap();
        assert_eq!(snapshot.record.unwrap().fencing_token, FencingToken(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_group_commit_every_operation_commits_alone() {
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(manager(
        &dir.path().join("leases.db"),
        &ManualClock::new(0),
        false,
    ));
    let attempts = (0..8).map(|i| {
        let m = Arc::clone(&m);
        async move { m.acquire(&actor("shared"), &node(&format!("n{i}"))).await }
    });
    let results = futures::future::join_all(attempts).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    let stats = m.store().stats();
    assert_eq!(
        (stats.transactions_committed, stats.operations_committed),
        (8, 8)
    );
}

#[tokio::test]
async fn two_handles_on_one_file_see_each_other() {
    // The same as two processes, without the processes: separate connections and writer
    // threads, serialised only by SQLite's locks.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let clock = ManualClock::new(0);
    let (m1, m2) = (manager(&path, &clock, true), manager(&path, &clock, true));
    let first = m1.acquire(&actor("a"), &node("n1")).await.unwrap();
    assert!(matches!(
        m2.acquire(&actor("a"), &node("n2")).await,
        Err(LeaseError::HeldByOther { .. })
    ));
    clock.advance_ms(LEASE_DURATION_MS);
    let second = m2.acquire(&actor("a"), &node("n2")).await.unwrap();
    assert!(second.fencing_token > first.fencing_token);
    assert!(matches!(
        m1.renew(&actor("a"), &node("n1")).await,
        Err(LeaseError::NotHolder { .. })
    ));
}

#[tokio::test]
async fn a_damaged_row_is_a_corrupt_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let clock = ManualClock::new(0);
    let m = manager(&path, &clock, true);
    m.acquire(&actor("good"), &node("n1")).await.unwrap();
    m.acquire(&actor("bad"), &node("n1")).await.unwrap();
    // Something other than the store writes a holder that is not a valid node id, past the
    // schema's checks.
    let conn = Connection::open(&path).unwrap();
    conn.execute(
        "UPDATE leases SET holder = 'no spaces allowed' WHERE actor_id = 'bad'",
        [],
    )
    .unwrap();
    drop(conn);
    for result in [
        m.acquire(&actor("bad"), &node("n2")).await,
        m.get(&actor("bad")).await.map(|_| unreachable_lease()),
    ] {
        match result {
            Err(LeaseError::Store(StoreError::Corrupt { location, reason })) => {
                assert!(location.contains(&path.display().to_string()), "{location}");
                assert!(
                    location.contains("bad") && reason.contains("holder"),
                    "{reason}"
                );
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    assert!(matches!(
        m.leases_held_by(&node("n1")).await,
        Err(LeaseError::Store(StoreError::Corrupt { .. }))
    ));
    // Other actors are unaffected.
    m.renew(&actor("good"), &node("n1")).await.unwrap();
}

fn unreachable_lease() -> kelpie_lease::Lease {
    panic!("a corrupt row must not load")
}

#[tokio::test]
async fn a_panicking_decision_panics_in_its_caller_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteLeaseStore::open(dir.path().join("leases.db")).unwrap();
    let request = LeaseRequest {
        fencing_token: None,
        op: LeaseOp::Acquire,
        node_id: node("n1"),
        lease_duration_ms: LEASE_DURATION_MS,
    };
    let a = actor("a");
    // A zero-length lease breaks `decide`'s preconditions (managers never send one: lease
    // durations are validated), so its assertion fires inside the writer thread.
    let broken = LeaseRequest {
        lease_duration_ms: 0,
        ..request.clone()
    };
    let caught =
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(store.apply(&a, &broken)))
            .await;
    let payload = caught.unwrap_err();
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()));
    assert!(message.is_some_and(|m| !m.is_empty()), "a panic message");
    assert_eq!(store.load(&a).await.unwrap().record, None);
    // The writer survived and serves the next operation.
    let decision = store.apply(&a, &request).await.unwrap();
    assert_eq!(decision.reply.unwrap().fencing_token, FencingToken(1));
}

#[tokio::test]
async fn a_write_lock_held_too_long_is_a_write_failure_that_applied_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let options = SqliteOptions::default().with_busy_timeout_ms(50);
    let store = SqliteLeaseStore::open_with(&path, options).unwrap();
    let m = SqliteLeaseManager::new(store, LeaseConfig::new(LEASE_DURATION_MS).unwrap());
    // Another process (here, another connection) holds the write lock past the busy timeout.
    let other = Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    match m.acquire(&actor("a"), &node("n1")).await {
        Err(LeaseError::Store(StoreError::WriteFailed { reason })) => {
            assert!(reason.contains(&path.display().to_string()), "{reason}");
            assert!(reason.contains("locked"), "{reason}");
        }
        other => panic!("expected WriteFailed, got {other:?}"),
    }
    // Readers are not blocked by a writer in WAL mode.
    assert_eq!(m.get(&actor("a")).await.unwrap(), None);
    other.execute_batch("ROLLBACK").unwrap();
    m.acquire(&actor("a"), &node("n1")).await.unwrap();
}

/// A file another process keeps locked past the busy timeout at open is a store that is
/// there but not answering (exit 3 in the CLI), not a bad path or setting (exit 2): it was
/// reported as `StoreError::Open`, so a supervisor read "fix your configuration".
#[test]
fn a_file_locked_past_the_busy_timeout_at_open_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    drop(SqliteLeaseStore::open(&path).unwrap());
    let other = Connection::open(&path).unwrap();
    other
        .execute_batch("PRAGMA locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE; SELECT 1 FROM meta;")
        .unwrap();
    let options = SqliteOptions::default().with_busy_timeout_ms(50);
    match SqliteLeaseStore::open_with(&path, options) {
        Err(StoreError::Unavailable { reason }) => {
            assert!(reason.contains(&path.display().to_string()), "{reason}");
            assert!(reason.contains("locked"), "{reason}");
        }
        other => panic!("expected Unavailable, got {:?}", other.err()),
    }
    other
        .execute_batch("COMMIT; PRAGMA locking_mode=NORMAL;")
        .unwrap();
    drop(other);
    SqliteLeaseStore::open(&path).unwrap();
}

#[test]
fn handles_opening_a_new_file_at_once_initialise_it_once() {
    // The first open creates the schema; `BEGIN IMMEDIATE` and a second look inside the
    // transaction make the others find it rather than create it again.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || SqliteLeaseStore::open(path).unwrap())
        })
        .collect();
    let stores: Vec<_> = openers.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, store) in stores.into_iter().enumerate() {
        let m = SqliteLeaseManager::new(store, LeaseConfig::default());
        let lease = futures::executor::block_on(m.acquire(&actor("a"), &node(&format!("n{i}"))));
        assert_eq!(lease.is_ok(), i == 0, "{lease:?}");
    }
}
