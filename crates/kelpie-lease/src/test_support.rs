//! Shared by the crate's unit tests.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use kelpie_core::{ActorId, Clock, SharedClock, SleepFuture};

use crate::error::StoreError;
use crate::lease::{LeaseOp, LeaseRequest};
use crate::memory::MemoryLeaseStore;
use crate::protocol::Decision;
use crate::store::{LeaseStore, RecordSnapshot, StoreSnapshot};

/// The output of a future that completes on its first poll, as the memory store's do.
pub(crate) fn ready<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("memory store futures complete on their first poll"),
    }
}

/// Tokio's own clock, for tests on a paused runtime (`#[tokio::test(start_paused = true)]`).
///
/// Paused time moves only when every task waits on a timer, straight to the next one, so a
/// test on real-time leases of a few hundred milliseconds runs in no time and cannot see a
/// lease lapse because a loaded machine did not schedule its keeper. `TokioClock` reads the
/// machine's counter instead, which a paused runtime does not stop.
#[derive(Debug)]
pub(crate) struct PausedClock {
    origin: tokio::time::Instant,
}

impl PausedClock {
    /// A clock whose epoch is now, as a [`SharedClock`].
    #[allow(clippy::disallowed_methods)] // tokio's clock, which the paused runtime controls
    pub(crate) fn shared() -> SharedClock {
        std::sync::Arc::new(Self {
            origin: tokio::time::Instant::now(),
        })
    }
}

impl Clock for PausedClock {
    #[allow(clippy::disallowed_methods)] // as in `shared`
    fn now_ms(&self) -> u64 {
        let elapsed = tokio::time::Instant::now() - self.origin;
        u64::try_from(elapsed.as_millis()).expect("a test runs for less than 584 million years")
    }

    #[allow(clippy::disallowed_methods)] // as in `shared`
    fn sleep(&self, duration: std::time::Duration) -> SleepFuture<'_> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// The memory store, unreachable while it is [`set_down`](Self::set_down), and hanging the
/// requests of one kind while they are [`held`](Self::hold).
pub(crate) struct FlakyStore {
    inner: MemoryLeaseStore,
    down: AtomicBool,
    /// Requests of this kind wait, neither answered nor failed, until it changes.
    held: Mutex<Option<LeaseOp>>,
    /// Wakes the held requests when `held` changes.
    let_go: tokio::sync::Notify,
    /// Requests waiting because they are held.
    waiting: AtomicUsize,
}

impl FlakyStore {
    /// An empty, reachable store timed by `clock`.
    pub(crate) fn new(clock: SharedClock) -> Self {
        Self {
            inner: MemoryLeaseStore::new(clock),
            down: AtomicBool::new(false),
            held: Mutex::new(None),
            let_go: tokio::sync::Notify::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Makes every request of kind `op` wait (`None`: lets them all go on). A held request
    /// waits before anything else, so it hangs even while the store is down.
    pub(crate) fn hold(&self, op: Option<LeaseOp>) {
        *self.held.lock().expect("not poisoned") = op;
        self.let_go.notify_waiters();
    }

    /// How many requests are waiting because they are held.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    async fn wait_if_held(&self, op: LeaseOp) {
        let mut counted = false;
        loop {
            let mut let_go = std::pin::pin!(self.let_go.notified());
            let_go.as_mut().enable();
            if *self.held.lock().expect("not poisoned") != Some(op) {
                break;
            }
            if !counted {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                counted = true;
            }
            let_go.await;
        }
        if counted {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Makes every request fail with [`StoreError::Unavailable`] (or succeed again).
    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(StoreError::Unavailable {
                reason: "partitioned".into(),
            }),
            false => Ok(()),
        }
    }
}

impl LeaseStore for FlakyStore {
    async fn apply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> Result<Decision, StoreError> {
        self.wait_if_held(request.op).await;
        self.check()?;
        self.inner.apply(actor_id, request).await
    }

    async fn load(&self, actor_id: &ActorId) -> Result<RecordSnapshot, StoreError> {
        self.check()?;
        self.inner.load(actor_id).await
    }

    async fn scan(&self) -> Result<StoreSnapshot, StoreError> {
        self.check()?;
        self.inner.scan().await
    }
}
