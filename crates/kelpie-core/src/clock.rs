//! The one way Kelpie code reads time.
//!
//! A [`Clock`] is a node's *local monotonic* clock: `now_ms` never goes backwards, and its
//! rate may differ from real time by a bounded drift. Lease expiry is never decided by
//! comparing two nodes' clocks; a store decides expiry on its own clock, and a node only
//! measures intervals on its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The future returned by [`Clock::sleep`].
pub type SleepFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A clock shared between tasks.
pub type SharedClock = Arc<dyn Clock>;

/// A local monotonic clock with an async sleep.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since this clock's epoch. Never decreases between two calls.
    fn now_ms(&self) -> u64;

    /// Completes once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> SleepFuture;
}

/// A clock that moves only when told to: for unit and conformance tests that must expire a
/// lease without waiting. A `sleep` advances the clock by its duration when first polled and
/// completes at once, so code that sleeps in a loop still makes progress.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        Self {
            now_ms: Arc::new(std::sync::atomic::AtomicU64::new(start_ms)),
        }
    }

    /// Moves the clock forward by `duration_ms`.
    pub fn advance_ms(&self, duration_ms: u64) {
        self.now_ms
            .fetch_add(duration_ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn sleep(&self, duration: Duration) -> SleepFuture {
        let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let clock = self.clone();
        // Time moves when the sleep is first polled, not when it is created, so a sleep that
        // loses a race (a timeout next to a reply that is already there) moves nothing.
        Box::pin(async move { clock.advance_ms(duration_ms) })
    }
}

/// Real time on tokio: `now_ms` counts from the clock's creation on the monotonic clock.
#[cfg(feature = "tokio")]
#[derive(Debug, Clone)]
pub struct TokioClock {
    origin: std::time::Instant,
}

#[cfg(feature = "tokio")]
impl TokioClock {
    /// A clock whose epoch is now.
    // This is the one place real time enters the libraries; the simulator substitutes its
    // own `Clock`, so banning `Instant::now` elsewhere keeps simulated code deterministic.
    #[allow(clippy::disallowed_methods)]
    pub fn new() -> Self {
        Self {
            origin: std::time::Instant::now(),
        }
    }
}

#[cfg(feature = "tokio")]
impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "tokio")]
impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).expect("process ran for 2^64 ms")
    }

    #[allow(clippy::disallowed_methods)]
    fn sleep(&self, duration: Duration) -> SleepFuture {
        Box::pin(tokio::time::sleep(duration))
    }
}

#[cfg(all(test, feature = "tokio"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokio_clock_is_monotonic_and_sleeps() {
        let clock = TokioClock::new();
        let before_ms = clock.now_ms();
        clock.sleep(Duration::from_millis(5)).await;
        let after_ms = clock.now_ms();
        assert!(
            after_ms >= before_ms + 5,
            "slept 5 ms but clock moved {before_ms}->{after_ms}"
        );
    }
}
