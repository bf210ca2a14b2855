//! Per-node simulated clocks.
//!
//! Every node may have its own local monotonic clock that runs at its own rate:
//! `local = offset + floor(global * (1_000_000 + drift_ppm) / 1_000_000)`. Because the rate is
//! positive this is monotone in global time, and `jump_forward` only ever adds to the offset,
//! so a [`SimClock`] honours the [`Clock`] contract of never going backwards.

use crate::executor::{lock, Shared};
use crate::timer::{duration_to_ms_ceil, slab_put, Sleep};
use kelpie_core::{Clock, SleepFuture};
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
    sleepers: Mutex<Sleepers>,
}

/// Where a registered sleep's waker is: its order of registration (the order `jump_forward`
/// wakes in) and its slot.
#[derive(Debug, Clone, Copy)]
struct SleeperKey {
    id: u64,
    slot: u32,
}

/// The wakers of a clock's pending sleeps, in a slab: registering and removing one (once per
/// sleep, on the hot path of every timeout) is an index, not a search of an ordered map. The
/// rare `jump_forward` sorts them by id to wake them in registration order.
#[derive(Debug, Default)]
struct Sleepers {
    /// `(id, waker)` of the sleep in each slot; `None` while the slot is free.
    slots: Vec<Option<(u64, Waker)>>,
    free: Vec<u32>,
    next_id: u64,
}

impl Sleepers {
    /// Registers a new sleeper waking `waker`.
    fn insert(&mut self, waker: &Waker) -> SleeperKey {
        let id = self.next_id;
        self.next_id += 1;
        let entry = Some((id, waker.clone()));
        let slot = slab_put(&mut self.slots, &mut self.free, entry);
        SleeperKey { id, slot }
    }

    /// The registered sleeper `key`'s entry.
    fn entry_mut(&mut self, key: SleeperKey) -> &mut (u64, Waker) {
        match &mut self.slots[key.slot as usize] {
            Some(entry) if entry.0 == key.id => entry,
            _ => panic!("sleeper {} is not in its slot {}", key.id, key.slot),
        }
    }

    /// Forgets the sleeper `key`.
    fn remove(&mut self, key: SleeperKey) {
        self.entry_mut(key);
        self.slots[key.slot as usize] = None;
        self.free.push(key.slot);
    }

    /// Every registered waker, in registration order.
    fn wakers_in_order(&self) -> Vec<Waker> {
        let mut entries: Vec<&(u64, Waker)> = self.slots.iter().flatten().collect();
        entries.sort_unstable_by_key(|&&(id, _)| id);
        entries
            .into_iter()
            .map(|(_, waker)| waker.clone())
            .collect()
    }
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
            sleepers: Mutex::new(Sleepers::default()),
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
        let wakers = lock(&self.state.sleepers).wakers_in_order();
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

    /// The local rate in parts per million of global time: positive, by the drift bound.
    #[inline]
    fn rate_ppm(&self) -> u64 {
        (PPM_PER_UNIT as i64 + self.state.drift_ppm).unsigned_abs()
    }

    /// Local time at global time `global_ms`.
    ///
    /// In `u64` whenever nothing overflows, which is always in practice (simulated times are
    /// far below 2^64 / 1.5e6 ms): the same value as the `i128` formula, without the software
    /// 128-bit division that costs more than the rest of a sleep's poll.
    #[inline]
    fn local_at(&self, global_ms: u64) -> u64 {
        let rate_ppm = self.rate_ppm();
        let offset_ms = self.offset_ms();
        let fast = global_ms
            .checked_mul(rate_ppm)
            .and_then(|scaled| offset_ms.checked_add(scaled / PPM_PER_UNIT as u64));
        fast.unwrap_or_else(|| local_at_wide(offset_ms, rate_ppm, global_ms))
    }

    /// The first global instant (not before now) at which local time reaches `target_ms`.
    #[inline]
    fn global_deadline_for(&self, target_ms: u64) -> u64 {
        let now_global_ms = self.shared.now_ms();
        let Some(needed_ms) = target_ms
            .checked_sub(self.offset_ms())
            .filter(|&needed_ms| needed_ms > 0)
        else {
            return now_global_ms;
        };
        let rate_ppm = self.rate_ppm();
        // Smallest g with floor(g * rate / 1e6) >= needed, that is g * rate >= needed * 1e6;
        // in `u64` unless that overflows (as for `local_at`).
        let global_ms = needed_ms
            .checked_mul(PPM_PER_UNIT as u64)
            .and_then(|scaled| scaled.checked_add(rate_ppm - 1))
            .map_or_else(
                || global_deadline_wide(needed_ms, rate_ppm),
                |g| g / rate_ppm,
            );
        global_ms.max(now_global_ms)
    }
}

/// [`SimClock::local_at`] in `i128`, for values whose `u64` products would overflow.
#[cold]
fn local_at_wide(offset_ms: u64, rate_ppm: u64, global_ms: u64) -> u64 {
    let scaled = (i128::from(global_ms) * i128::from(rate_ppm)).div_euclid(PPM_PER_UNIT);
    let local = i128::from(offset_ms) + scaled;
    u64::try_from(local).unwrap_or(u64::MAX)
}

/// [`SimClock::global_deadline_for`]'s division in `i128`, for values whose `u64` products
/// would overflow.
#[cold]
fn global_deadline_wide(needed_ms: u64, rate_ppm: u64) -> u64 {
    let rate = i128::from(rate_ppm);
    let global_ms = (i128::from(needed_ms) * PPM_PER_UNIT + rate - 1) / rate;
    u64::try_from(global_ms).unwrap_or(u64::MAX)
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
    sleeper: Option<SleeperKey>,
}

impl ClockSleep {
    fn register_sleeper(&mut self, waker: &Waker) {
        let mut sleepers = lock(&self.clock.state.sleepers);
        match self.sleeper {
            None => self.sleeper = Some(sleepers.insert(waker)),
            Some(key) => {
                let (_, existing) = sleepers.entry_mut(key);
                if !existing.will_wake(waker) {
                    *existing = waker.clone();
                }
            }
        }
    }

    #[inline]
    fn unregister_sleeper(&mut self) {
        if let Some(key) = self.sleeper.take() {
            self.remove_sleeper(key);
        }
    }

    #[inline(never)]
    fn remove_sleeper(&self, key: SleeperKey) {
        lock(&self.clock.state.sleepers).remove(key);
    }

    /// Ends the sleep: its sleeper and inner sleep are dropped.
    #[inline]
    fn finish(&mut self) {
        self.unregister_sleeper();
        self.inner = None;
    }

    /// [`Future::poll`] while the local clock is short of the target.
    #[inline(never)]
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Two rounds suffice: the deadline is exact, so once the inner sleep is due the local
        // clock has reached the target.
        for _ in 0..2 {
            if self.clock.now_ms() >= self.target_local_ms {
                self.finish();
                return Poll::Ready(());
            }
            let deadline_ms = self.clock.global_deadline_for(self.target_local_ms);
            if self.inner.as_ref().map(Sleep::deadline_ms) != Some(deadline_ms) {
                self.inner = Some(Sleep::until(self.clock.shared.clone(), deadline_ms));
            }
            // A pending poll leaves the sleeper and the inner sleep's timer registered with
            // the same waker, and only a poll changes either: so while the inner timer still
            // wakes this waker, so does the sleeper, and the clock's lock is not needed.
            let inner = self.inner.as_ref().expect("inner sleep was just set");
            if self.sleeper.is_none() || !inner.is_registered_with(cx.waker()) {
                self.register_sleeper(cx.waker());
            }
            let inner = self.inner.as_mut().expect("inner sleep was just set");
            if Pin::new(inner).poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        panic!("node clock sleep reached its global deadline but not its local target");
    }
}

impl Future for ClockSleep {
    type Output = ();

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // The usual second poll, after the timer fired: no call for it.
        if self.clock.now_ms() >= self.target_local_ms {
            self.finish();
            return Poll::Ready(());
        }
        self.poll_waiting(cx)
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

    /// The `u64` fast paths give the `i128` formulas' values, and the formulas take over
    /// where the fast paths would overflow.
    #[test]
    fn the_u64_paths_match_the_wide_formulas() {
        let shared = Arc::new(Shared::default());
        let mut rng = crate::rng::DeterministicRng::new(5);
        for drift_ppm in [-CLOCK_DRIFT_PPM_ABS_MAX, -77_777, 0, 1, 499_999] {
            for offset_ms in [0, 12_345, u64::MAX / 3, u64::MAX - 5] {
                let clock = SimClock::new(shared.clone(), offset_ms, drift_ppm);
                let rate_ppm = clock.rate_ppm();
                for _ in 0..200 {
                    let global_ms = match rng.gen_range(0..3u32) {
                        0 => rng.gen_range(0..10_000_000u64),
                        1 => rng.gen_range(0..u64::MAX / 1_000_000),
                        _ => rng.next_u64(),
                    };
                    let wide = local_at_wide(offset_ms, rate_ppm, global_ms);
                    assert_eq!(clock.local_at(global_ms), wide, "{drift_ppm} {offset_ms}");
                    let target_ms = rng.next_u64() >> rng.gen_range(0..64u32);
                    let needed = i128::from(target_ms) - i128::from(offset_ms);
                    let expected = if needed <= 0 {
                        0
                    } else {
                        let rate = i128::from(rate_ppm);
                        let g = (needed * PPM_PER_UNIT + rate - 1) / rate;
                        u64::try_from(g).unwrap_or(u64::MAX)
                    };
                    assert_eq!(clock.global_deadline_for(target_ms), expected);
                }
            }
        }
    }

    /// A jump wakes every pending sleeper once, in the order they first registered, however
    /// the slab reused their slots.
    #[test]
    fn a_jump_wakes_sleepers_in_registration_order() {
        use std::sync::Mutex as StdMutex;
        struct Record(usize, Arc<StdMutex<Vec<usize>>>);
        impl std::task::Wake for Record {
            fn wake(self: Arc<Self>) {
                self.1.lock().unwrap().push(self.0);
            }
        }
        let woken = Arc::new(StdMutex::new(Vec::new()));
        let waker = |n| Waker::from(Arc::new(Record(n, woken.clone())));
        let mut sleepers = Sleepers::default();
        let keys: Vec<SleeperKey> = (0..5).map(|n| sleepers.insert(&waker(n))).collect();
        sleepers.remove(keys[1]);
        sleepers.remove(keys[3]);
        let late = sleepers.insert(&waker(5));
        sleepers.insert(&waker(6));
        sleepers.entry_mut(late).1 = waker(7);
        sleepers.wakers_in_order().into_iter().for_each(Waker::wake);
        assert_eq!(*woken.lock().unwrap(), vec![0, 2, 4, 7, 6]);
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
