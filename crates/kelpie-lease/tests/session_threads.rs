//! A session on a multi-threaded runtime: its driver and its callers' acquires run on
//! different threads at once, as in `kelpie node`. Nothing here runs in the simulator, whose
//! one thread never interleaves two of them inside a step.

use std::sync::Arc;

use kelpie_core::{ActorId, NodeId, SharedClock, TokioClock};
use kelpie_lease::{LeaseConfig, LeaseSession, MemoryLeaseManager, SessionConfig};

/// Actors acquired at once: enough for the driver's rounds to overlap acquires finishing on
/// other threads many times over.
const ACTORS_COUNT: usize = 2_000;

/// Every guard handed out with a long lease is still valid once all are: none was cancelled
/// by the driver as if its belief were gone. The driver read the beliefs, then took the
/// guards' lock; an acquire on another thread that started its belief and inserted its guard
/// in between had its guard cancelled at once: 8 of 2,000 actors of a `kelpie node` start on
/// SQLite, and here, in each of ten runs, from 20 to over 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_guard_is_cancelled_while_its_belief_holds() {
    let clock: SharedClock = Arc::new(TokioClock::new());
    let config = LeaseConfig::new(100_000).unwrap();
    let manager = Arc::new(MemoryLeaseManager::in_memory(clock, config));
    let node = NodeId::new("n").unwrap();
    let session = LeaseSession::start(manager, node, SessionConfig::default()).unwrap();
    let acquires: Vec<_> = (0..ACTORS_COUNT)
        .map(|i| {
            let session = session.clone();
            let actor = ActorId::new(format!("a{i}")).unwrap();
            tokio::spawn(async move { session.acquire(&actor).await })
        })
        .collect();
    let mut guards = Vec::new();
    for acquire in acquires {
        guards.push(acquire.await.unwrap().unwrap());
    }
    // The driver's round after the last acquire.
    tokio::task::yield_now().await;
    let cancelled: Vec<_> = guards
        .iter()
        .filter(|guard| guard.cancellation().is_cancelled())
        .map(|guard| guard.actor_id().clone())
        .collect();
    assert!(
        cancelled.is_empty(),
        "{} of {ACTORS_COUNT} guards cancelled while believed, the first {:?}",
        cancelled.len(),
        &cancelled[..cancelled.len().min(5)]
    );
    assert!(guards.iter().all(|guard| guard.is_valid()));
    session.shutdown().await;
}
