//! The etcd backend in the swarm: the production `EtcdLeaseManager` on every node, over the
//! simulated etcd (`kelpie_dst::sim_etcd`), with every fault of the swarm's mix, every
//! invariant checked after every step, liveness after healing and etcd's own history checked
//! for linearizability (`kelpie_dst::etcd_history`); and each mutation of the etcd backend (and
//! a simulated etcd serving stale reads) caught by the check it breaks.
//!
//! `DST_SEEDS=<n>` sets how many seeds run (default 300); `DST_SEED=<n>` runs exactly one.
//! `cargo test -p kelpie-dst --release --test etcd_dst -- --nocapture` prints the figures.

use std::collections::BTreeMap;

use kelpie_dst::mutations::Mutation;
use kelpie_dst::{
    swarm_faults, LeaseRunReport, LeaseScenario, SwarmStore, SWARM_COVERAGE_MARKS,
    SWARM_LEASE_FAULTS,
};
use kelpie_lease::coverage::{
    COVERAGE_MARKS, ETCD_COVERAGE_MARKS, MARK_EXPIRED_LEASE_SEEN, MARK_TAKEOVER_AFTER_EXPIRY,
};
use kelpie_sim::{FaultType, SimConfig, SimError, Simulation, Sweep, SweepEnd};

/// Seeds run when `DST_SEEDS` is not set.
const SEEDS_DEFAULT: u64 = 300;
/// Seeds a broken etcd backend may survive before the swarm must have caught it.
const MUTATION_SEEDS_MAX: u64 = 300;
/// Lease durations the etcd swarm draws from: at 1 s, etcd's 2 s minimum TTL leaves the
/// session a second of slack beyond the lease; at 2 s the TTL is the lease, with none.
const ETCD_LEASE_DURATIONS_MS: [u64; 2] = [1_000, 2_000];

/// A seed's outcome and the coverage marks it hit (taken on the thread that ran it).
type Marked = (
    Result<LeaseRunReport, SimError>,
    BTreeMap<&'static str, u64>,
);

fn etcd_scenario() -> LeaseScenario {
    let mut scenario = LeaseScenario::default();
    scenario.cluster.store = SwarmStore::Etcd;
    scenario
}

fn run_seed(seed: u64, mut scenario: LeaseScenario) -> Result<LeaseRunReport, SimError> {
    if scenario.cluster.lease_duration_ms == LeaseScenario::default().cluster.lease_duration_ms {
        let index = (kelpie_sim::derive_seed(seed, "etcd/lease-duration") % 2) as usize;
        scenario.cluster.lease_duration_ms = ETCD_LEASE_DURATIONS_MS[index];
    }
    let mut simulation = Simulation::new(SimConfig::new(seed));
    for fault in swarm_faults(seed, SWARM_LEASE_FAULTS) {
        simulation = simulation.with_fault(fault);
    }
    scenario.run(simulation)
}

fn run_seed_marked(seed: u64, scenario: LeaseScenario) -> Marked {
    let _ = kelpie_core::coverage::take_hits();
    let result = run_seed(seed, scenario);
    (result, kelpie_core::coverage::take_hits())
}

/// The marks an etcd run must hit: the keeper's, the swarm's and the etcd backend's, not the
/// protocol's (`decide` does not run on etcd).
fn etcd_marks() -> Vec<&'static str> {
    let protocol = [MARK_TAKEOVER_AFTER_EXPIRY, MARK_EXPIRED_LEASE_SEEN];
    (COVERAGE_MARKS.iter().filter(|m| !protocol.contains(m)))
        .chain(SWARM_COVERAGE_MARKS)
        .chain(ETCD_COVERAGE_MARKS)
        .copied()
        .collect()
}

#[test]
fn test_etcd_swarm_safety_and_liveness_with_every_mark_hit() {
    let sweep = kelpie_sim::test_sweep(SEEDS_DEFAULT);
    let mut faults: BTreeMap<FaultType, u64> = BTreeMap::new();
    let mut marks: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut sim_ms, mut ops, mut steps, mut etcd_requests) = (0u64, 0u64, 0u64, 0u64);
    let cpu_started = cpu_time::ProcessTime::now();
    let end = sweep.run(
        |seed| run_seed_marked(seed, etcd_scenario()),
        |(result, _): &Marked| result.is_err(),
        || true,
        |seed, (result, seed_marks)| {
            let report = result.unwrap_or_else(|error| panic!("seed {seed}: {error}"));
            let checked = report
                .linearizability
                .unwrap_or_else(|| panic!("seed {seed}: etcd's history was not checked"));
            assert!(checked.operations_checked > 0, "seed {seed}: empty history");
            etcd_requests += checked.operations_checked as u64;
            for (fault, count) in &report.sim.faults_fired {
                *faults.entry(*fault).or_default() += count;
            }
            for (mark, count) in seed_marks {
                *marks.entry(mark).or_default() += count;
            }
            sim_ms += report.sim.sim_time_ms;
            ops += report.ops.total();
            steps += report.sim.steps;
        },
    );
    let cpu_s = cpu_started.elapsed().as_secs_f64();
    let seeds_run = end.seeds_run();
    assert_eq!(seeds_run, sweep.seeds_count(), "every seed ran");
    println!(
        "etcd swarm: {seeds_run} seeds, {} simulated s, {ops} lease operations, {steps} steps, \
         zero violations, {etcd_requests} etcd answers checked linearizable; {:.0} seeds per \
         CPU second",
        sim_ms / 1000,
        seeds_run as f64 / cpu_s.max(1e-9)
    );
    for (fault, count) in &faults {
        println!("  fault {:<24} fired {count}", fault.name());
    }
    for (mark, count) in &marks {
        println!("  mark  {mark:<40} hit {count}");
    }
    assert!(ops > 0, "the nodes made lease requests");
    if seeds_run >= SEEDS_DEFAULT {
        for fault in SWARM_LEASE_FAULTS {
            assert!(
                faults.get(fault).copied().unwrap_or(0) > 0,
                "fault {} never fired in {seeds_run} seeds",
                fault.name()
            );
        }
        for mark in etcd_marks() {
            assert!(
                marks.contains_key(mark),
                "coverage mark {mark} never hit in {seeds_run} seeds"
            );
        }
    }
}

/// The first seed from a fixed base that `mutation` fails, and the invariant it failed.
fn caught(mutation: Mutation) -> (u64, String) {
    let mut scenario = etcd_scenario();
    mutation.apply(&mut scenario);
    let asked_ms = scenario.cluster.lease_duration_ms;
    if mutation.lease_duration_ms(asked_ms) != asked_ms {
        // Only where the TTL is the lease does a keepalive counted from its reply outlast
        // etcd's expiry; at 1 s leases the 2 s minimum TTL hides it.
        scenario.cluster.lease_duration_ms = mutation.lease_duration_ms(asked_ms);
    }
    let mut failure = None;
    let end = Sweep::new(1, MUTATION_SEEDS_MAX).run(
        |seed| run_seed(seed, scenario),
        Result::is_err,
        || true,
        |seed, result| match result {
            Ok(_) => {}
            Err(SimError::InvariantViolated { invariant, .. }) => {
                failure = Some((seed, invariant));
            }
            Err(other) => panic!("{}: failed otherwise: {other}", mutation.name()),
        },
    );
    match (end, failure) {
        (SweepEnd::Stopped { .. }, Some(failure)) => failure,
        _ => panic!("{} survived {MUTATION_SEEDS_MAX} seeds", mutation.name()),
    }
}

#[test]
fn test_etcd_mutations_are_caught_by_the_invariant_they_break() {
    let etcd_mutations = Mutation::ALL.into_iter().filter(|m| m.on_etcd());
    let mut seen = 0;
    for mutation in etcd_mutations {
        let (seed, invariant) = caught(mutation);
        println!("{}: seed {seed}, {invariant}", mutation.name());
        assert!(
            mutation.caught_first_by().contains(&invariant.as_str()),
            "{}: caught by {invariant}, expected one of {:?}",
            mutation.name(),
            mutation.caught_first_by()
        );
        seen += 1;
    }
    assert_eq!(
        seen, 6,
        "the five etcd backend mutations and the stale-read etcd"
    );
}
