//! The swarm: many seeds, each with its own fault mix, over the networked lease scenario
//! (production keepers, partitions, crashes, clock drift and jumps, storage faults), each with
//! a safety phase and a liveness phase, and at its end a linearizability check of every lease
//! operation the nodes made.
//!
//! `DST_SEEDS=<n>` sets how many seeds run (default 40); `DST_SEED=<n>` runs exactly one.
//! `cargo test -p kelpie-dst --release --test swarm_dst -- --nocapture` prints the figures.

use std::collections::BTreeMap;

use kelpie_dst::checkers::CheckerSet;
use kelpie_dst::mutations::LINEARIZABILITY;
use kelpie_dst::{swarm_faults, LeaseRunReport, LeaseScenario, SWARM_LEASE_FAULTS};
use kelpie_lease::COVERAGE_MARKS;
use kelpie_sim::{FaultType, SimConfig, SimError, Simulation};

/// Seeds run when `DST_SEEDS` is not set.
const SEEDS_DEFAULT: u64 = 40;
/// Seeds a broken keeper may survive before the swarm must have caught it.
const MUTATION_SEEDS_MAX: u64 = 500;
/// Seeds a store serving stale reads may survive before the linearizability check must have
/// caught it.
const STALE_READ_SEEDS_MAX: u64 = 200;

fn seeds() -> Vec<u64> {
    kelpie_sim::test_seeds(SEEDS_DEFAULT)
}

/// Lease durations the swarm draws from, one per seed: short leases put network delay and
/// timeouts close to the lease, where keeper bugs show (a stale release was found at 200 ms).
const SWARM_LEASE_DURATIONS_MS: [u64; 3] = [200, 500, 1_000];

fn run_seed(seed: u64, mut scenario: LeaseScenario) -> Result<LeaseRunReport, SimError> {
    let index = (kelpie_sim::derive_seed(seed, "swarm/lease-duration") % 3) as usize;
    scenario.cluster.lease_duration_ms = SWARM_LEASE_DURATIONS_MS[index];
    let mut simulation = Simulation::new(SimConfig::new(seed));
    for fault in swarm_faults(seed, SWARM_LEASE_FAULTS) {
        simulation = simulation.with_fault(fault);
    }
    scenario.run(simulation)
}

#[test]
fn test_swarm_lease_safety_and_liveness_with_every_mark_hit() {
    let seeds = seeds();
    let mut faults: BTreeMap<FaultType, u64> = BTreeMap::new();
    let mut marks: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut sim_ms, mut ops) = (0u64, 0u64);
    let (mut checked_ops, mut unanswered_ops, mut search_states) = (0, 0, 0);
    let _ = kelpie_core::coverage::take_hits();
    for &seed in &seeds {
        let report = run_seed(seed, LeaseScenario::default()).unwrap_or_else(|error| {
            let phase = if error.to_string().contains("liveness violation") {
                "liveness"
            } else {
                "safety"
            };
            panic!("{phase} failure: {error}")
        });
        if std::env::var("DST_CHECK_DETERMINISM").as_deref() == Ok("1") {
            assert!(
                report.sim.determinism_checked,
                "seed {seed} was run twice and compared"
            );
        }
        for (fault, count) in &report.sim.faults_fired {
            *faults.entry(*fault).or_default() += count;
        }
        for (mark, count) in kelpie_core::coverage::take_hits() {
            *marks.entry(mark).or_default() += count;
        }
        sim_ms += report.sim.sim_time_ms;
        ops += report.ops.total();
        let checked = report
            .linearizability
            .unwrap_or_else(|| panic!("seed {seed}: the history was not checked"));
        assert!(checked.operations_checked > 0, "seed {seed}: empty history");
        checked_ops += checked.operations_checked;
        unanswered_ops += checked.unknown_operations;
        search_states += checked.states_explored;
    }
    println!(
        "swarm: {} seeds, {} simulated s, {ops} lease operations, zero violations",
        seeds.len(),
        sim_ms / 1000
    );
    println!(
        "  linearizable: {checked_ops} recorded operations ({unanswered_ops} unanswered), \
         {search_states} search states"
    );
    for (fault, count) in &faults {
        println!("  fault {:<24} fired {count}", fault.name());
    }
    for (mark, count) in &marks {
        println!("  mark  {mark:<40} hit {count}");
    }
    if seeds.len() as u64 >= SEEDS_DEFAULT {
        for mark in COVERAGE_MARKS {
            assert!(
                marks.contains_key(mark),
                "coverage mark {mark} never hit in {} seeds",
                seeds.len()
            );
        }
    }
}

fn caught_within(broken: impl Fn(&mut LeaseScenario)) -> (u64, String) {
    let base = SimConfig::from_env_or_random().seed;
    for i in 0..MUTATION_SEEDS_MAX {
        let mut scenario = LeaseScenario::default();
        broken(&mut scenario);
        match run_seed(base.wrapping_add(i), scenario) {
            Ok(_) => continue,
            Err(SimError::InvariantViolated { invariant, .. }) => return (i + 1, invariant),
            Err(other) => panic!("broken keeper failed otherwise: {other}"),
        }
    }
    panic!("a broken keeper survived {MUTATION_SEEDS_MAX} seeds from {base}");
}

#[test]
fn test_swarm_catches_belief_measured_from_reply() {
    let (seeds, invariant) = caught_within(|s| s.bug_belief_from_reply = true);
    println!("belief-from-reply caught by {invariant} after {seeds} seeds");
    assert!(
        invariant == "BeliefConsistency" || invariant == "LeaseUniqueness",
        "{invariant}"
    );
}

#[test]
fn test_swarm_catches_keeper_without_drift_margin() {
    let (seeds, invariant) = caught_within(|s| s.bug_no_drift_margin = true);
    println!("no-drift-margin caught by {invariant} after {seeds} seeds");
    assert!(
        invariant == "BeliefConsistency" || invariant == "LeaseUniqueness",
        "{invariant}"
    );
}

/// The store sometimes decides a request on the previous version of the record (a stale read)
/// and writes the decision over the current one. The linearizability check, and only it (the
/// other checkers are off), must catch that within [`STALE_READ_SEEDS_MAX`] seeds, and say
/// where.
#[test]
fn test_swarm_linearizability_catches_stale_reads() {
    let base = SimConfig::from_env_or_random().seed;
    for i in 0..STALE_READ_SEEDS_MAX {
        let mut scenario = LeaseScenario::default();
        scenario.bug_stale_reads = true;
        scenario.cluster.checkers = CheckerSet::NONE;
        let message = match run_seed(base.wrapping_add(i), scenario) {
            Ok(_) => continue,
            Err(SimError::InvariantViolated {
                invariant, message, ..
            }) if invariant == LINEARIZABILITY => message,
            Err(other) => panic!("the stale store failed otherwise: {other}"),
        };
        assert!(
            message.contains("linearizability violation on actor-"),
            "the stale store failed otherwise: {message}"
        );
        assert!(message.contains("smallest offending window"), "{message}");
        println!(
            "stale reads caught by the linearizability check after {} seeds:",
            i + 1
        );
        println!("{message}");
        return;
    }
    panic!("a store serving stale reads survived {STALE_READ_SEEDS_MAX} seeds from {base}");
}
