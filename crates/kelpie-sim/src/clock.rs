//! Per-node simulated clocks.
//!
//! Every node may have its own local monotonic clock that runs at its own rate:
//! `local = offset + floor(global * (1_000_000 + drift_ppm) / 1_000_000)`. Because the rate is
//! positive this is monotone in global time, and `jump_forward` only ever adds to the offset,
//! so a [`SimClock`] honours the [`Clock`] contract of never going backwards.

use crate::executor::Shared;
use crate::timer::{duration_to_ms_ceil, Timer};
use kelpie_core::{Clock, SleepFuture};
use std::borrow::Borrow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Largest drift, in parts per million either way, a node clock may have. Half speed to one
/// and a half speed is far beyond real hardware and keeps the local rate strictly positive.
pub const CLOCK_DRIFT_PPM_ABS_MAX: i64 = 500_000;
/// Parts per million in one.
const PPM_PER_UNIT: i128 = 1_000_000;

/// The state a node clock shares between its clones, the simulation's time included: one
/// reference count per clone (a boxed sleep owns one), not two.
#[derive(Debug)]
struct ClockState {
    /// The simulation's global time and timers.
    shared: Arc<Shared>,
    /// Tags the timers of this clock's sleeps, which `jump_forward` wakes so they can finish
    /// early: unique within the run, never [`GLOBAL_TIME`](crate::timer::GLOBAL_TIME).
    id: u64,
    offset_ms: AtomicU64,
    drift_ppm: i64,
}

/// A node's local simulated clock. Cloning shares it; it is `Send + Sync` and implements
/// [`kelpie_core::Clock`], so code under test reads time through it.
#[derive(Clone)]
pub struct SimClock {
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
            id: shared.new_clock_id(),
            shared,
            offset_ms: AtomicU64::new(offset_ms),
            drift_ppm,
        };
        Self {
            state: Arc::new(state),
        }
    }

    /// Local time now, in ms.
    pub fn now_ms(&self) -> u64 {
        self.local_at(self.state.shared.now_ms())
    }

    /// Global (true) simulated time now, in ms.
    pub fn global_now_ms(&self) -> u64 {
        self.state.shared.now_ms()
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
        // Woken outside the timers' borrow: a waker may run code that sets a timer.
        let wakers = self.state.shared.timers().wakers_of_clock(self.state.id);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// A future that completes once this clock has advanced by `duration`.
    pub fn sleep_local(&self, duration: Duration) -> ClockSleep<&SimClock> {
        ClockSleep::new(self, duration)
    }

    /// A future that completes once this clock reads `local_ms` (at once if it already does).
    pub fn sleep_until_local(&self, local_ms: u64) -> ClockSleep<&SimClock> {
        ClockSleep::until(self, local_ms)
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
        let now_global_ms = self.state.shared.now_ms();
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

    fn sleep(&self, duration: Duration) -> SleepFuture<'_> {
        // Borrows the clock: no reference count up and down per sleep.
        Box::pin(ClockSleep::new(self, duration))
    }
}

/// A sleep measured on a node's local clock; completes at the first global instant at which
/// the local clock has reached its target.
#[derive(Debug)]
#[must_use = "a ClockSleep does nothing unless awaited"]
pub struct ClockSleep<C: Borrow<SimClock> = SimClock> {
    /// The clock, owned (a [`Clock`]'s boxed sleep) or borrowed (a sleep awaited in place,
    /// which then touches no reference count).
    clock: C,
    target_local_ms: u64,
    /// The deadline on global time at which the local clock reaches the target, as last
    /// computed, and its timer. The timer carries the clock's id, so a jump of the clock wakes
    /// it.
    timer: Option<Timer>,
}

impl<C: Borrow<SimClock>> ClockSleep<C> {
    /// A sleep of `duration` on `clock`, from now.
    pub fn new(clock: C, duration: Duration) -> Self {
        let now_ms = clock.borrow().now_ms();
        Self::until(clock, now_ms.saturating_add(duration_to_ms_ceil(duration)))
    }

    /// A sleep on `clock` until it reads `target_local_ms`.
    pub fn until(clock: C, target_local_ms: u64) -> Self {
        Self {
            clock,
            target_local_ms,
            timer: None,
        }
    }

    /// Ends the sleep: its timer, if still set, is removed.
    #[inline]
    fn finish(&mut self) {
        drop_timer(&mut self.timer, &self.clock.borrow().state.shared);
    }

    /// [`Future::poll`] while the local clock is short of the target.
    #[inline(never)]
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Self {
            clock,
            target_local_ms,
            timer,
        } = self;
        let clock: &SimClock = (*clock).borrow();
        // Two rounds suffice: the deadline is exact, so once the timer is due the local clock
        // has reached the target.
        for _ in 0..2 {
            if clock.now_ms() >= *target_local_ms {
                drop_timer(timer, &clock.state.shared);
                return Poll::Ready(());
            }
            // A jump moves the deadline sooner: the jump woke this sleep through its timer,
            // and the timer moves here.
            let deadline_ms = clock.global_deadline_for(*target_local_ms);
            if timer.as_ref().map(Timer::deadline_ms) != Some(deadline_ms) {
                drop_timer(timer, &clock.state.shared);
                *timer = Some(Timer::at(deadline_ms, clock.state.id));
            }
            let set = timer.as_mut().expect("the timer was just set");
            if set.poll(&clock.state.shared, cx).is_pending() {
                return Poll::Pending;
            }
        }
        panic!("node clock sleep reached its global deadline but not its local target");
    }
}

/// Removes `timer` from the queue if it is set and has not fired, and forgets it.
#[inline]
fn drop_timer(timer: &mut Option<Timer>, shared: &Shared) {
    if let Some(mut timer) = timer.take() {
        timer.cancel(shared);
    }
}

impl<C: Borrow<SimClock> + Unpin> Future for ClockSleep<C> {
    type Output = ();

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Neither the clock handle nor the timer is pinned: the sleep moves freely.
        let this = self.get_mut();
        // The usual second poll, after the timer fired: no call for it.
        if this.clock.borrow().now_ms() >= this.target_local_ms {
            this.finish();
            return Poll::Ready(());
        }
        this.poll_waiting(cx)
    }
}

impl<C: Borrow<SimClock>> Drop for ClockSleep<C> {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timer::Sleep;

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

    /// A jump wakes the pending timers of that clock's sleeps, in the order they were set,
    /// however the slab reused their slots; not another clock's, nor a global sleep's.
    #[test]
    fn a_jump_wakes_its_clocks_sleeps_in_the_order_their_timers_were_set() {
        use std::sync::Mutex as StdMutex;
        struct Record(usize, Arc<StdMutex<Vec<usize>>>);
        impl std::task::Wake for Record {
            fn wake(self: Arc<Self>) {
                self.1.lock().unwrap().push(self.0);
            }
        }
        let woken = Arc::new(StdMutex::new(Vec::new()));
        let waker = |n| Waker::from(Arc::new(Record(n, woken.clone())));
        let shared = Arc::new(Shared::default());
        let (jumping, other) = (
            SimClock::new(shared.clone(), 0, 0),
            SimClock::new(shared.clone(), 0, 0),
        );
        let mut sleeps: Vec<ClockSleep<&SimClock>> = (0..5)
            .map(|n| jumping.sleep_local(Duration::from_millis(100 + n)))
            .collect();
        let poll = |sleep: &mut ClockSleep<&SimClock>, n: usize| {
            let waker = waker(n);
            Pin::new(sleep).poll(&mut Context::from_waker(&waker))
        };
        for (n, sleep) in sleeps.iter_mut().enumerate() {
            assert!(poll(sleep, n).is_pending());
        }
        drop(sleeps.remove(3));
        drop(sleeps.remove(1));
        let mut late = jumping.sleep_local(Duration::from_millis(50));
        assert!(poll(&mut late, 5).is_pending());
        let mut another = other.sleep_local(Duration::from_millis(50));
        assert!(poll(&mut another, 6).is_pending());
        let mut global = Sleep::until(shared.clone(), 50);
        assert!(Pin::new(&mut global)
            .poll(&mut Context::from_waker(&waker(7)))
            .is_pending());
        assert!(poll(&mut late, 8).is_pending(), "polled by another waker");
        jumping.jump_forward(10);
        assert_eq!(*woken.lock().unwrap(), vec![0, 2, 4, 8]);
        // Woken, each sleep moves its timer sooner, and a jump past its target ends it.
        assert!(poll(&mut late, 9).is_pending());
        assert_eq!(shared.timers().next_deadline_ms(), Some(40));
        jumping.jump_forward(60);
        assert!(poll(&mut late, 9).is_ready());
        assert!(poll(&mut sleeps[0], 0).is_pending());
        assert_eq!(shared.timers().next_deadline_ms(), Some(30));
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
