//! Sweeps of many seeds in one process: a seed costs the same however many seeds ran before
//! it on the same thread, and a sweep on several threads gives every seed the same outcome,
//! coverage marks included, as on one.
//!
//! Costs are counted in deterministic units (allocations and coverage-mark updates per
//! executor step, on the thread that ran the seed), never in wall time, so the test cannot
//! flake on a loaded machine: the same seeds always give the same figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use kelpie_dst::{swarm_faults, LeaseRunReport, LeaseScenario, SWARM_LEASE_FAULTS};
use kelpie_sim::{SimConfig, SimError, Simulation, Sweep, SweepEnd};

/// Seeds of the growth test: issue 18 saw the cost per seed double within 2,000 seeds.
const GROWTH_SEEDS_COUNT: u64 = 3_000;
/// Blocks the growth test compares (the first with the last).
const GROWTH_BLOCKS_COUNT: u64 = 10;
/// Most the cost per step of the last block may exceed the first block's.
const GROWTH_FACTOR_MAX: f64 = 1.3;
/// Base seed of the growth test: issue 18's.
const GROWTH_BASE_SEED: u64 = 7_000_000;
/// Seeds of the test comparing one job with several.
const JOBS_SEEDS_COUNT: u64 = 48;

/// Counts the allocations of each thread, so a seed's count is its own even while other tests
/// of this binary run on other threads.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every call is passed on unchanged to the system allocator; counting touches only a
// const-initialized thread-local without a destructor, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: the caller's guarantees for `alloc` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: the caller's guarantees for `realloc` are passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// A short swarm seed: three nodes, two actors, three simulated seconds of faults.
fn run_short_seed(seed: u64) -> Result<LeaseRunReport, SimError> {
    let mut scenario = LeaseScenario::default();
    scenario.sim_duration_ms = 3_000;
    let config = SimConfig::new(seed).with_failure_banner(false);
    let simulation = swarm_faults(seed, SWARM_LEASE_FAULTS)
        .into_iter()
        .fold(Simulation::new(config), Simulation::with_fault);
    scenario.run(simulation)
}

/// What one seed cost on its thread.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    steps: u64,
    allocations: u64,
    marks_counted: u64,
}

impl Cost {
    fn add(&mut self, other: Cost) {
        self.steps += other.steps;
        self.allocations += other.allocations;
        self.marks_counted += other.marks_counted;
    }

    fn per_step(self) -> (f64, f64) {
        let steps = self.steps.max(1) as f64;
        (
            self.allocations as f64 / steps,
            self.marks_counted as f64 / steps,
        )
    }
}

/// Issue 18: the cost of a seed grew with the seeds run before it on the same thread (the
/// linearizability check re-marked, one by one, every coverage hit the thread had ever
/// counted). The seeds run on one thread that never takes its marks, as `kelpie sim` did; the
/// last block's allocations and mark updates per executor step must stay within
/// [`GROWTH_FACTOR_MAX`] of the first block's.
#[test]
fn test_sweep_cost_per_seed_does_not_grow_with_seeds_run_before() {
    let block_len = GROWTH_SEEDS_COUNT / GROWTH_BLOCKS_COUNT;
    let mut blocks = vec![Cost::default(); GROWTH_BLOCKS_COUNT as usize];
    let mut delivered = 0;
    let sweep = Sweep::new(GROWTH_BASE_SEED, GROWTH_SEEDS_COUNT);
    let job = |seed| {
        let (allocations_before, marks_before) =
            (allocations(), kelpie_core::coverage::hits_counted());
        let report = run_short_seed(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        Cost {
            steps: report.sim.steps,
            allocations: allocations() - allocations_before,
            marks_counted: kelpie_core::coverage::hits_counted() - marks_before,
        }
    };
    let end = sweep.run(
        job,
        |_| false,
        || true,
        |_, cost| {
            blocks[(delivered / block_len) as usize].add(cost);
            delivered += 1;
        },
    );
    assert_eq!(
        end,
        SweepEnd::Done {
            seeds_run: GROWTH_SEEDS_COUNT
        }
    );
    let (first, last) = (blocks[0], blocks[blocks.len() - 1]);
    let ((first_allocs, first_marks), (last_allocs, last_marks)) =
        (first.per_step(), last.per_step());
    println!(
        "per step, first {block_len} seeds: {first_allocs:.2} allocations, {first_marks:.4} \
         mark updates; last {block_len}: {last_allocs:.2}, {last_marks:.4}"
    );
    assert!(first.marks_counted > 0, "the swarm hits coverage marks");
    assert!(
        last_allocs <= first_allocs * GROWTH_FACTOR_MAX,
        "allocations per step grew from {first_allocs:.2} to {last_allocs:.2}"
    );
    assert!(
        last_marks <= first_marks * GROWTH_FACTOR_MAX,
        "coverage mark updates per step grew from {first_marks:.4} to {last_marks:.4}"
    );
}

/// What a seed produced, as far as a report could show it.
#[derive(Debug, PartialEq, Eq)]
struct SeedFigures {
    seed: u64,
    trace_hash: u64,
    steps: u64,
    marks: BTreeMap<&'static str, u64>,
}

fn figures_on(jobs: usize) -> Vec<SeedFigures> {
    let jobs = NonZeroUsize::new(jobs).expect("jobs > 0");
    let sweep = Sweep::new(GROWTH_BASE_SEED, JOBS_SEEDS_COUNT).with_jobs(jobs);
    let mut figures = Vec::new();
    let job = |seed| {
        // A worker thread's marks are its seeds'; taken before and after, they are this seed's.
        let _ = kelpie_core::coverage::take_hits();
        let report = run_short_seed(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        SeedFigures {
            seed,
            trace_hash: report.sim.trace_hash,
            steps: report.sim.steps,
            marks: kelpie_core::coverage::take_hits(),
        }
    };
    sweep.run(job, |_| false, || true, |_, seed| figures.push(seed));
    figures
}

/// Seeds spread over threads give each seed the same run and the same coverage marks, in the
/// same order, as one thread does.
#[test]
fn test_sweep_on_several_threads_gives_every_seed_the_same_outcome() {
    let one = figures_on(1);
    assert_eq!(one.len() as u64, JOBS_SEEDS_COUNT);
    assert!(
        one.iter().any(|seed| !seed.marks.is_empty()),
        "marks are hit"
    );
    assert_eq!(figures_on(3), one);
}
