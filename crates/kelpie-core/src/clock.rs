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

/// The future returned by [`Clock::sleep`]. It may borrow the clock, so that a sleep need not
/// take a reference count on it (a keeper sleeps twice a round).
pub type SleepFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A clock shared between tasks.
pub type SharedClock = Arc<dyn Clock>;

/// A local monotonic clock with an async sleep.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since this clock's epoch. Never decreases between two calls.
    fn now_ms(&self) -> u64;

    /// Completes once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> SleepFuture<'_>;
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

    fn sleep(&self, duration: Duration) -> SleepFuture<'_> {
        let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        // Time moves when the sleep is first polled, not when it is created, so a sleep that
        // loses a race (a timeout next to a reply that is already there) moves nothing.
        Box::pin(async move { self.advance_ms(duration_ms) })
    }
}

/// Real time on tokio: `now_ms` counts from the clock's creation on the monotonic clock.
///
/// The reading comes from the CPU's time-stamp counter where it is invariant, calibrated
/// against the operating system's monotonic clock (by `quanta`, which falls back to that clock
/// where the counter is missing or unreliable): a few nanoseconds against the 30 to 50 a
/// `clock_gettime` call costs in a virtual machine, and a lease store reads the clock on every
/// request. The counters of two cores may differ slightly, so the clocks cloned from one keep a
/// shared floor: no reading is earlier than one already returned, on any thread.
#[cfg(feature = "tokio")]
#[derive(Debug, Clone)]
pub struct TokioClock {
    counter: quanta::Clock,
    origin_raw: u64,
    floor_ms: Arc<std::sync::atomic::AtomicU64>,
}

#[cfg(feature = "tokio")]
impl TokioClock {
    /// A clock whose epoch is now.
    // This and `now_ms` are the one place real time enters the libraries; the simulator
    // substitutes its own `Clock`, so banning `Instant::now` and quanta's readings elsewhere
    // (clippy.toml) keeps simulated code deterministic.
    #[allow(clippy::disallowed_methods)]
    pub fn new() -> Self {
        let counter = quanta::Clock::new();
        let origin_raw = counter.raw();
        Self {
            counter,
            origin_raw,
            floor_ms: Arc::default(),
        }
    }
}

/// `now_ms`, or the latest reading already returned from `floor_ms` if that is later; raises
/// the floor otherwise. The floor is read without a locked instruction, and raised once per
/// millisecond.
#[cfg(feature = "tokio")]
fn floored_ms(floor_ms: &std::sync::atomic::AtomicU64, now_ms: u64) -> u64 {
    use std::sync::atomic::Ordering;
    let seen_ms = floor_ms.load(Ordering::Relaxed);
    if now_ms <= seen_ms {
        return seen_ms;
    }
    // Another reader may have raised it further meanwhile: the later of the two.
    floor_ms.fetch_max(now_ms, Ordering::Relaxed).max(now_ms)
}

#[cfg(feature = "tokio")]
impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "tokio")]
impl Clock for TokioClock {
    #[allow(clippy::disallowed_methods)] // the real clock, read here only
    fn now_ms(&self) -> u64 {
        const NANOS_PER_MS: u64 = 1_000_000;
        // Nanoseconds in 64 bits last 584 years from the clock's creation.
        let elapsed_ns = self
            .counter
            .delta_as_nanos(self.origin_raw, self.counter.raw());
        floored_ms(&self.floor_ms, elapsed_ns / NANOS_PER_MS)
    }

    #[allow(clippy::disallowed_methods)]
    fn sleep(&self, duration: Duration) -> SleepFuture<'_> {
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

    /// A reading below one already returned (another core's counter a little behind) comes
    /// back as the earlier reading, and a later one raises the floor.
    #[test]
    fn readings_never_go_below_one_already_returned() {
        let floor_ms = std::sync::atomic::AtomicU64::new(0);
        assert_eq!(floored_ms(&floor_ms, 7), 7);
        assert_eq!(floored_ms(&floor_ms, 6), 7, "an earlier reading is raised");
        assert_eq!(floored_ms(&floor_ms, 7), 7);
        assert_eq!(floored_ms(&floor_ms, 9), 9);
        assert_eq!(floor_ms.into_inner(), 9);
    }

    /// Clones share one timeline: a reading on one thread, passed to another, is never later
    /// than what the other reads next from its clone.
    #[test]
    fn clones_read_one_timeline_across_threads() {
        let clock = TokioClock::new();
        let (readings, received) = std::sync::mpsc::channel();
        let writer = {
            let clock = clock.clone();
            std::thread::spawn(move || {
                for _ in 0..2_000 {
                    readings.send(clock.now_ms()).expect("reader alive");
                }
            })
        };
        let mut received_count = 0;
        for sent_ms in received {
            let read_ms = clock.now_ms();
            assert!(
                read_ms >= sent_ms,
                "read {read_ms} after {sent_ms} was sent"
            );
            received_count += 1;
        }
        writer.join().expect("writer thread");
        assert_eq!(received_count, 2_000);
    }
}
