//! A sweep: many seeds of one scenario, run on several threads, delivered in seed order.
//!
//! A simulated run is single-threaded and deterministic, so seeds are independent: a sweep
//! hands them out to `jobs` worker threads and gives each outcome back to the caller, on the
//! caller's thread, in seed order. Whatever the caller builds from the outcomes (totals, the
//! first failure, a report) is therefore the same for any number of jobs.
//!
//! - **Seeds.** Seed `i` of a sweep of `count` seeds from `base` is `base + i` (wrapping). A
//!   [`Shard`] `I/N` runs the indices that are `I` modulo `N`, so `N` processes (a CI matrix,
//!   a batch system) together run the whole sweep once.
//! - **Stopping.** An outcome the caller's `stops` says is final (a failure, unless the caller
//!   keeps going) ends the sweep: no seed after it in seed order is started any more, every
//!   seed before it still runs and is delivered, and nothing after it is. A worker that is in
//!   the middle of a later seed finishes that seed (a simulated run cannot be interrupted) and
//!   its outcome is dropped.
//! - **Budget.** `more` is asked before each seed is started; once it says no, no further
//!   seed starts, so the seeds run are always the first ones of the shard, in order.
//! - **Per-thread state.** Each seed runs on one worker thread from start to end, so
//!   thread-local state the simulated code keeps (coverage marks) is that thread's: the job
//!   takes what it needs from it before returning, and returns it as part of its outcome.
//!
//! Memory is bounded: a worker does not start a seed more than
//! [`SWEEP_REORDER_WINDOW_PER_JOB`] seeds per job ahead of the last one delivered, so outcomes
//! waiting for a slow earlier seed never pile up.
//!
//! ```
//! use std::num::NonZeroUsize;
//! use kelpie_sim::{Sweep, SweepEnd};
//!
//! let sweep = Sweep::new(100, 50).with_jobs(NonZeroUsize::new(4).unwrap());
//! let mut seen = Vec::new();
//! let end = sweep.run(|seed| seed * 2, |_| false, || true, |seed, doubled| {
//!     assert_eq!(doubled, seed * 2);
//!     seen.push(seed);
//! });
//! assert_eq!(seen, (100..150).collect::<Vec<_>>()); // in seed order, whatever the jobs
//! assert_eq!(end, SweepEnd::Done { seeds_run: 50 });
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Seeds a worker may run ahead of the last delivered one, per job: enough that a slow seed
/// rarely idles the other workers, few enough that the outcomes waiting behind it stay small.
pub const SWEEP_REORDER_WINDOW_PER_JOB: u64 = 64;
/// Most worker threads of one sweep.
pub const SWEEP_JOBS_MAX: usize = 1_024;
/// Stack of each worker thread: the size of a main thread's on Linux, since a seed run on the
/// main thread before sweeps were parallel.
pub const SWEEP_WORKER_STACK_BYTES: usize = 8 << 20;

/// One process's part of a sweep: the seed indices that are `index` modulo `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shard {
    index: u64,
    count: u64,
}

/// Why a shard was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// Not of the form `I/N`.
    #[error("{value:?} is not a shard I/N (e.g. 0/3: the first of three shards)")]
    Syntax {
        /// The refused text.
        value: String,
    },
    /// `N` was zero.
    #[error("a sweep cannot be split into 0 shards")]
    NoShards,
    /// `I` was not below `N`.
    #[error("shard {index}/{count} does not exist: shards of {count} are numbered 0..{count}")]
    IndexOutOfRange {
        /// The index given.
        index: u64,
        /// The number of shards.
        count: u64,
    },
}

impl Shard {
    /// The whole sweep: one shard of one.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`.
    pub fn new(index: u64, count: u64) -> Result<Self, ShardError> {
        if count == 0 {
            return Err(ShardError::NoShards);
        }
        if index >= count {
            return Err(ShardError::IndexOutOfRange { index, count });
        }
        Ok(Self { index, count })
    }

    /// Which shard this is, from 0.
    pub fn index(self) -> u64 {
        self.index
    }

    /// How many shards the sweep is split into.
    pub fn count(self) -> u64 {
        self.count
    }

    /// Whether this is the whole sweep.
    pub fn is_whole(self) -> bool {
        self.count == 1
    }

    /// Whether seed index `index` of the sweep belongs to this shard.
    pub fn contains(self, index: u64) -> bool {
        index % self.count == self.index
    }

    /// Seeds of a sweep of `count` seeds that fall in this shard.
    pub fn seeds_in(self, count: u64) -> u64 {
        count.saturating_sub(self.index).div_ceil(self.count)
    }
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let syntax = || ShardError::Syntax {
            value: value.to_string(),
        };
        let (index, count) = value.trim().split_once('/').ok_or_else(syntax)?;
        let index: u64 = index.trim().parse().map_err(|_| syntax())?;
        let count: u64 = count.trim().parse().map_err(|_| syntax())?;
        Shard::new(index, count)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Which seeds a sweep runs and on how many threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    base_seed: u64,
    count: u64,
    shard: Shard,
    jobs: NonZeroUsize,
}

/// How a sweep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepEnd {
    /// Every seed of the shard ran.
    Done {
        /// Seeds delivered.
        seeds_run: u64,
    },
    /// An outcome ended the sweep; it was the last one delivered.
    Stopped {
        /// Seeds delivered, the stopping one included.
        seeds_run: u64,
        /// The seed whose outcome ended it.
        seed: u64,
    },
    /// The budget ran out before every seed ran.
    BudgetSpent {
        /// Seeds delivered: the first ones of the shard.
        seeds_run: u64,
    },
}

impl SweepEnd {
    /// Seeds delivered.
    pub fn seeds_run(self) -> u64 {
        match self {
            SweepEnd::Done { seeds_run }
            | SweepEnd::Stopped { seeds_run, .. }
            | SweepEnd::BudgetSpent { seeds_run } => seeds_run,
        }
    }
}

impl Sweep {
    /// `count` seeds from `base_seed` upwards, on one thread, unsharded.
    pub fn new(base_seed: u64, count: u64) -> Self {
        Self {
            base_seed,
            count,
            shard: Shard::WHOLE,
            jobs: NonZeroUsize::MIN,
        }
    }

    /// Runs on `jobs` threads (at most [`SWEEP_JOBS_MAX`], and never more than there are
    /// seeds).
    pub fn with_jobs(mut self, jobs: NonZeroUsize) -> Self {
        assert!(
            jobs.get() <= SWEEP_JOBS_MAX,
            "{jobs} jobs: callers bound jobs by SWEEP_JOBS_MAX"
        );
        self.jobs = jobs;
        self
    }

    /// Runs only the seeds of `shard`.
    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// The seed at position `position` of this shard's seeds.
    pub fn seed_at(&self, position: u64) -> u64 {
        let index = self.shard.index + position * self.shard.count;
        assert!(index < self.count, "position {position} is past the sweep");
        self.base_seed.wrapping_add(index)
    }

    /// Seeds this shard runs if nothing stops it.
    pub fn seeds_count(&self) -> u64 {
        self.shard.seeds_in(self.count)
    }

    /// Runs `job` on every seed of the shard, in `jobs` threads, and hands each outcome to
    /// `deliver` on this thread, in seed order. An outcome for which `stops` is true ends the
    /// sweep after it is delivered; `more` is asked before each seed starts, and once it is
    /// false no further seed starts. A panic in `job` or `deliver` stops the other workers
    /// and is resumed here.
    pub fn run<T, J, S, M, D>(&self, job: J, stops: S, more: M, mut deliver: D) -> SweepEnd
    where
        T: Send,
        J: Fn(u64) -> T + Sync,
        S: Fn(&T) -> bool + Sync,
        M: Fn() -> bool + Sync,
        D: FnMut(u64, T),
    {
        let seeds_count = self.seeds_count();
        let workers = u64::try_from(self.jobs.get())
            .expect("jobs are bounded")
            .min(seeds_count.max(1));
        let window = SWEEP_REORDER_WINDOW_PER_JOB * workers;
        let claims = Claims::new(seeds_count, window);
        let (sender, receiver) = mpsc::channel::<(u64, T)>();
        // Workers take the caller's thread name (a test's name under libtest), so whatever
        // names the thread, such as the test filter of the DST_SEED banner, names the caller.
        let name = std::thread::current().name().map(str::to_string);
        std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for _ in 0..workers {
                let (sender, claims) = (sender.clone(), &claims);
                let (job, stops, more) = (&job, &stops, &more);
                let builder = std::thread::Builder::new().stack_size(SWEEP_WORKER_STACK_BYTES);
                let builder = match &name {
                    Some(name) => builder.name(name.clone()),
                    None => builder,
                };
                let handle = builder
                    .spawn_scoped(scope, move || {
                        let _abort_on_panic = AbortOnPanic(claims);
                        while let Some(position) = claims.claim(more) {
                            let outcome = job(self.seed_at(position));
                            if stops(&outcome) {
                                claims.end_after(position);
                            }
                            // The receiver is gone only once the sweep is over.
                            if sender.send((position, outcome)).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("the OS starts a sweep worker thread");
                handles.push(handle);
            }
            drop(sender);
            let end = {
                let _abort_on_panic = AbortOnPanic(&claims);
                self.deliver_in_order(&receiver, &claims, &stops, &mut deliver)
            };
            // Later seeds still running finish and are dropped; a worker's panic goes on here.
            drop(receiver);
            for handle in handles {
                if let Err(panic) = handle.join() {
                    std::panic::resume_unwind(panic);
                }
            }
            end
        })
    }

    /// Receives outcomes, delivers them in order, and says how the sweep ended.
    fn deliver_in_order<T>(
        &self,
        receiver: &mpsc::Receiver<(u64, T)>,
        claims: &Claims,
        stops: &impl Fn(&T) -> bool,
        deliver: &mut impl FnMut(u64, T),
    ) -> SweepEnd {
        let mut waiting: BTreeMap<u64, T> = BTreeMap::new();
        let mut delivered = 0;
        // Ends when every worker has exited: all seeds claimed were sent, or a worker panicked.
        for (position, outcome) in receiver {
            waiting.insert(position, outcome);
            while let Some(outcome) = waiting.remove(&delivered) {
                let seed = self.seed_at(delivered);
                let stop = stops(&outcome);
                deliver(seed, outcome);
                delivered += 1;
                claims.delivered(delivered);
                if stop {
                    return SweepEnd::Stopped {
                        seeds_run: delivered,
                        seed,
                    };
                }
            }
        }
        match claims.budget_spent() {
            true => SweepEnd::BudgetSpent {
                seeds_run: delivered,
            },
            false => SweepEnd::Done {
                seeds_run: delivered,
            },
        }
    }
}

/// Which positions workers may still start, shared between them and the delivering thread.
struct Claims {
    state: Mutex<ClaimState>,
    window_moved: Condvar,
}

struct ClaimState {
    /// The next position to start.
    next: u64,
    /// Positions from here on are not started: the shard's end, lowered by a stopping outcome
    /// or the budget.
    end: u64,
    /// Positions delivered so far.
    delivered: u64,
    /// Most positions started ahead of the delivered ones.
    window: u64,
    budget_spent: bool,
    aborted: bool,
}

impl Claims {
    fn new(end: u64, window: u64) -> Self {
        Self {
            state: Mutex::new(ClaimState {
                next: 0,
                end,
                delivered: 0,
                window,
                budget_spent: false,
                aborted: false,
            }),
            window_moved: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ClaimState> {
        // A panic elsewhere is handled by `AbortOnPanic`; the state itself stays consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next position to run, waiting while it is a whole window ahead of delivery; `None`
    /// when there is none left to start.
    fn claim(&self, more: &impl Fn() -> bool) -> Option<u64> {
        let mut state = self.lock();
        loop {
            if state.aborted || state.next >= state.end {
                return None;
            }
            if state.next < state.delivered + state.window {
                break;
            }
            state = self
                .window_moved
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if !more() {
            state.budget_spent = true;
            state.end = state.next;
            self.window_moved.notify_all();
            return None;
        }
        let position = state.next;
        state.next += 1;
        Some(position)
    }

    /// Nothing after `position` starts any more.
    fn end_after(&self, position: u64) {
        let mut state = self.lock();
        state.end = state.end.min(position + 1);
        self.window_moved.notify_all();
    }

    fn delivered(&self, delivered: u64) {
        let mut state = self.lock();
        state.delivered = delivered;
        self.window_moved.notify_all();
    }

    fn budget_spent(&self) -> bool {
        self.lock().budget_spent
    }
}

/// Stops every worker if the thread holding it panics, so none waits for a delivery that
/// will never come.
struct AbortOnPanic<'a>(&'a Claims);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.lock();
            state.aborted = true;
            self.0.window_moved.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn jobs(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    fn collect(sweep: Sweep, stop_at: Option<u64>) -> (Vec<u64>, SweepEnd) {
        let mut seen = Vec::new();
        let end = sweep.run(
            |seed| seed,
            |&seed| Some(seed) == stop_at,
            || true,
            |seed, outcome| {
                assert_eq!(seed, outcome);
                seen.push(seed);
            },
        );
        (seen, end)
    }

    #[test]
    fn outcomes_arrive_in_seed_order_for_any_number_of_jobs() {
        for n in [1, 2, 3, 8] {
            let (seen, end) = collect(Sweep::new(u64::MAX - 5, 300).with_jobs(jobs(n)), None);
            let expected: Vec<u64> = (0..300).map(|i| (u64::MAX - 5).wrapping_add(i)).collect();
            assert_eq!(seen, expected, "{n} jobs");
            assert_eq!(end, SweepEnd::Done { seeds_run: 300 });
        }
    }

    #[test]
    fn the_first_stopping_seed_in_order_ends_the_sweep() {
        for n in [1, 2, 4] {
            let (seen, end) = collect(Sweep::new(0, 1_000).with_jobs(jobs(n)), Some(517));
            assert_eq!(seen, (0..=517).collect::<Vec<_>>(), "{n} jobs");
            assert_eq!(
                end,
                SweepEnd::Stopped {
                    seeds_run: 518,
                    seed: 517
                }
            );
        }
    }

    #[test]
    fn later_seeds_stop_being_started_once_one_stops() {
        let started = AtomicU64::new(0);
        let sweep = Sweep::new(0, 100_000).with_jobs(jobs(4));
        sweep.run(
            |seed| {
                started.fetch_add(1, Ordering::Relaxed);
                seed
            },
            |&seed| seed == 10,
            || true,
            |_, _| {},
        );
        let window = SWEEP_REORDER_WINDOW_PER_JOB * 4;
        assert!(started.load(Ordering::Relaxed) <= 11 + window);
    }

    #[test]
    fn shards_partition_the_sweep() {
        let mut all: Vec<u64> = Vec::new();
        for index in 0..3 {
            let shard = Shard::new(index, 3).unwrap();
            let sweep = Sweep::new(40, 10).with_shard(shard).with_jobs(jobs(2));
            let (seen, end) = collect(sweep, None);
            assert_eq!(end.seeds_run(), shard.seeds_in(10));
            assert!(seen.iter().all(|seed| shard.contains(seed - 40)));
            all.extend(seen);
        }
        all.sort_unstable();
        assert_eq!(all, (40..50).collect::<Vec<_>>());
    }

    #[test]
    fn a_spent_budget_leaves_the_first_seeds_run() {
        let budget = AtomicU64::new(37);
        let sweep = Sweep::new(0, 1_000).with_jobs(jobs(3));
        let mut seen = Vec::new();
        let end = sweep.run(
            |seed| seed,
            |_| false,
            || budget.fetch_sub(1, Ordering::Relaxed) > 0,
            |seed, _| seen.push(seed),
        );
        assert_eq!(end, SweepEnd::BudgetSpent { seeds_run: 37 });
        assert_eq!(seen, (0..37).collect::<Vec<_>>());
    }

    #[test]
    fn a_panicking_job_ends_the_sweep_with_its_panic() {
        let caught = std::panic::catch_unwind(|| {
            Sweep::new(0, 10_000).with_jobs(jobs(3)).run(
                |seed| assert!(seed != 77, "job failed at 77"),
                |_| false,
                || true,
                |_, _| {},
            )
        });
        let panic = caught.unwrap_err();
        let message = match panic.downcast_ref::<&str>() {
            Some(text) => text.to_string(),
            None => panic.downcast_ref::<String>().cloned().unwrap_or_default(),
        };
        assert!(message.contains("job failed at 77"), "{message}");
    }

    #[test]
    fn workers_take_the_callers_thread_name() {
        let caller = std::thread::current().name().map(str::to_string);
        Sweep::new(0, 8).with_jobs(jobs(2)).run(
            |_| std::thread::current().name().map(str::to_string),
            |_| false,
            || true,
            |_, name| assert_eq!(name, caller),
        );
    }

    #[test]
    fn shards_parse_and_bad_ones_are_refused() {
        assert_eq!("1/3".parse::<Shard>(), Ok(Shard::new(1, 3).unwrap()));
        assert_eq!(Shard::new(1, 3).unwrap().to_string(), "1/3");
        assert_eq!(
            "3/3".parse::<Shard>(),
            Err(ShardError::IndexOutOfRange { index: 3, count: 3 })
        );
        assert_eq!("0/0".parse::<Shard>(), Err(ShardError::NoShards));
        for bad in ["", "1", "a/3", "1/b", "-1/3", "1/3/4"] {
            assert!(
                matches!(bad.parse::<Shard>(), Err(ShardError::Syntax { .. })),
                "{bad}"
            );
        }
        assert_eq!(Shard::new(2, 3).unwrap().seeds_in(10), 3);
        assert_eq!(Shard::new(0, 3).unwrap().seeds_in(10), 4);
        assert_eq!(Shard::new(5, 9).unwrap().seeds_in(3), 0);
    }
}
