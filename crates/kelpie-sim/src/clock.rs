//! Per-node simulated clocks.
//!
//! Every node may have its own local monotonic clock that runs at its own rate:
//! `local = offset + floor(global * (1_000_000 + drift_ppm) / 1_000_000)`. Because the rate is
//! positive this is monotone in global time, and `jump_forward` only ever adds to the offset,
//! so a [`SimClock`] honours the [`Clock`] contract of never going backwards.

use crate::executor::{lock, Shared};
use crate::timer::{duration_to_ms_ceil, Sleep};
use kelpie_core::{Clock, SleepFuture};
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Largest drift, in parts per million either way, a node clock may have. Half speed to one
/// and a half speed is far beyond real hardware and keeps the local rate strictly positive.
pub const CLOCK_DRIFT_PPM_ABS_MAX: i64 = 500_000;
/// Parts per million in one.
const PPM_PER_UNIT: i128 = 1_000_000;

/// The state a node clock shares between its clones.
#[derive(Debug)]
struct ClockState {
    offset_ms: AtomicU64,
    drift_ppm: i64,
    /// Wakers of pending sleeps, woken by `jump_forward` so they can finish early.
    sleepers: Mutex<BTreeMap<u64, Waker>>,
    next_sleeper: AtomicU64,
}

/// A node's local simulated clock. Cloning shares it; it is `Send + Sync` and implements
/// [`kelpie_core::Clock`], so code under test reads time through it.
#[derive(Clone)]
pub struct SimClock {
    shared: Arc<Shared>,
    state: Arc<ClockState>,
}

impl SimClock {
    /// A clock `offset_ms` ahead of global time that runs `drift_ppm` fast (or slow, if
    /// negative).
    ///
    /// # Panics
    /// If `|drift_ppm|` exceeds [`CLOCK_DRIFT_PPM_ABS_MAX`].
    pub(crate) fn new(shared: Arc<Shared>, offset_ms: u64, drift_ppm: i64) -> Self {
        assert!(
            drift_ppm.abs() <= CLOCK_DRIFT_PPM_ABS_MAX,
            "node clock drift {drift_ppm} ppm is beyond ±{CLOCK_DRIFT_PPM_ABS_MAX} ppm"
        );
        let state = ClockState {
            offset_ms: AtomicU64::new(offset_ms),
            drift_ppm,
            sleepers: Mutex::new(BTreeMap::new()),
            next_sleeper: AtomicU64::new(0),
        };
        Self {
            shared,
            state: Arc::new(state),
        }
    }

    /// Local time now, in ms.
    pub fn now_ms(&self) -> u64 {
        self.local_at(self.shared.now_ms())
    }

    /// Global (true) simulated time now, in ms.
    pub fn global_now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    /// The current offset, in ms (grows with [`SimClock::jump_forward`]).
    pub fn offset_ms(&self) -> u64 {
        self.state.offset_ms.load(Ordering::Acquire)
    }

    /// The drift rate, in parts per million.
    pub fn drift_ppm(&self) -> i64 {
        self.state.drift_ppm
    }

    /// Jumps this clock forward by `jump_ms` (it never goes backwards). Pending sleeps on it
    /// are re-evaluated and may complete at once.
    pub fn jump_forward(&self, jump_ms: u64) {
        self.state.offset_ms.fetch_add(jump_ms, Ordering::AcqRel);
        let wakers: Vec<Waker> = lock(&self.state.sleepers).values().cloned().collect();
        wakers.into_iter().for_each(Waker::wake);
    }

    /// A future that completes once this clock has advanced by `duration`.
    pub fn sleep_local(&self, duration: Duration) -> ClockSleep {
        let target_local_ms = self.now_ms().saturating_add(duration_to_ms_ceil(duration));
        ClockSleep {
            clock: self.clone(),
            target_local_ms,
            inner: None,
            sleeper: None,
        }
    }

    /// The first global instant (not before now) at which this clock reads `local_ms`, if it
    /// neither jumps nor changes rate before then.
    pub fn global_when_local_reaches(&self, local_ms: u64) -> u64 {
        self.global_deadline_for(local_ms)
    }

    /// Local time at global time `global_ms`.
    fn local_at(&self, global_ms: u64) -> u64 {
        let rate = PPM_PER_UNIT + i128::from(self.state.drift_ppm);
        let scaled = (i128::from(global_ms) * rate).div_euclid(PPM_PER_UNIT);
        let local = i128::from(self.offset_ms()) + scaled;
        u64::try_from(local).unwrap_or(u64::MAX)
    }

    /// The first global instant (not before now) at which local time reaches `target_ms`.
    fn global_deadline_for(&self, target_ms: u64) -> u64 {
        let now_global_ms = self.shared.now_ms();
        let needed = i128::from(target_ms) - i128::from(self.offset_ms());
        if needed <= 0 {
            return now_global_ms;
        }
        let rate = PPM_PER_UNIT + i128::from(self.state.drift_ppm);
        // Smallest g with floor(g * rate / 1e6) >= needed, that is g * rate >= needed * 1e6.
        let global_ms = (needed * PPM_PER_UNIT + rate - 1) / rate;
        u64::try_from(global_ms)
            .unwrap_or(u64::MAX)
            .max(now_global_ms)
    }
}

impl fmt::Debug for SimClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimClock")
            .field("now_ms", &self.now_ms())
            .field("offset_ms", &self.offset_ms())
            .field("drift_ppm", &self.drift_ppm())
            .finish()
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        SimClock::now_ms(self)
    }

    fn sleep(&self, duration: Duration) -> SleepFuture {
        Box::pin(self.sleep_local(duration))
    }
}

/// A sleep measured on a node's local clock; completes at the first global instant at which
/// the local clock has reached its target.
#[derive(Debug)]
#[must_use = "a ClockSleep does nothing unless awaited"]
pub struct ClockSleep {
    clock: SimClock,
    target_local_ms: u64,
    inner: Option<Sleep>,
    sleeper: Option<u64>,
}

impl ClockSleep {
    fn register_sleeper(&mut self, waker: &Waker) {
        let id = match self.sleeper {
            Some(id) => id,
            None => {
                let id = self.clock.state.next_sleeper.fetch_add(1, Ordering::AcqRel);
                self.sleeper = Some(id);
                id
            }
        };
        let mut sleepers = lock(&self.clock.state.sleepers);
        match sleepers.get(&id) {
            Some(existing) if existing.will_wake(waker) => {}
            _ => {
                sleepers.insert(id, waker.clone());
            }
        }
    }

    fn unregister_sleeper(&mut self) {
        if let Some(id) = self.sleeper.take() {
            lock(&self.clock.state.sleepers).remove(&id);
        }
    }
}

impl Future for ClockSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Two rounds suffice: the deadline is exact, so once the inner sleep is due the local
        // clock has reached the target.
        for _ in 0..2 {
            if self.clock.now_ms() >= self.target_local_ms {
                self.unregister_sleeper();
                self.inner = None;
                return Poll::Ready(());
            }
            let deadline_ms = self.clock.global_deadline_for(self.target_local_ms);
            if self.inner.as_ref().map(Sleep::deadline_ms) != Some(deadline_ms) {
                self.inner = Some(Sleep::until(self.clock.shared.clone(), deadline_ms));
            }
            self.register_sleeper(cx.waker());
            let inner = self.inner.as_mut().expect("inner sleep was just set");
            if Pin::new(inner).poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        panic!("node clock sleep reached its global deadline but not its local target");
    }
}

impl Drop for ClockSleep {
    fn drop(&mut self) {
        self.unregister_sleeper();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kelpie_core::Clock` requires `Send + Sync`; this fails to compile if that breaks.
    const _: fn() = || {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<SimClock>();
        assert_send_sync::<ClockSleep>();
        assert_send_sync::<Sleep>();
    };

    #[test]
    fn local_time_follows_offset_and_drift_and_is_monotone() {
        let shared = Arc::new(Shared::default());
        let fast = SimClock::new(shared.clone(), 1_000, 100_000);
        let slow = SimClock::new(shared.clone(), 0, -100_000);
        assert_eq!(fast.now_ms(), 1_000);
        shared.set_now_ms(10_000);
        assert_eq!(fast.now_ms(), 12_000);
        assert_eq!(slow.now_ms(), 9_000);
        let mut previous = 0;
        for global_ms in 0..5_000 {
            let local = slow.local_at(global_ms);
            assert!(
                local >= previous,
                "local clock went backwards at global {global_ms}"
            );
            previous = local;
        }
        fast.jump_forward(500);
        assert_eq!(fast.now_ms(), 12_500);
    }

    #[test]
    fn deadline_is_the_first_global_instant_reaching_the_target() {
        let shared = Arc::new(Shared::default());
        for drift_ppm in [-333_333, -1, 0, 7, 123_457, CLOCK_DRIFT_PPM_ABS_MAX] {
            let clock = SimClock::new(shared.clone(), 3, drift_ppm);
            for target in [4, 100, 1_001, 77_777] {
                let global = clock.global_deadline_for(target);
                assert!(
                    clock.local_at(global) >= target,
                    "drift {drift_ppm} target {target}"
                );
                assert!(global == 0 || clock.local_at(global - 1) < target);
            }
        }
    }
}
