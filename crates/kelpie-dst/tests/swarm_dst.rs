//! The swarm: many seeds, each with its own fault mix, over the networked lease scenario
//! (production keepers, partitions, crashes, clock drift and jumps, storage faults), each with
//! a safety phase and a liveness phase, and at its end a linearizability check of every lease
//! operation the nodes made.
//!
//! `DST_SEEDS=<n>` sets how many seeds run (default 40); `DST_SEED=<n>` runs exactly one.
//! Seeds run on every core through [`kelpie_sim::Sweep`] (the runner of `kelpie sim`), which
//! hands their outcomes back in seed order: the first failing seed in seed order is the one
//! reported, and each seed's coverage marks are taken on the thread that ran it.
//! `cargo test -p kelpie-dst --release --test swarm_dst -- --nocapture` prints the figures;
//! `-- --ignored` adds the large swarm (20 nodes, 1,000 actors).

use std::collections::BTreeMap;

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_dst::checkers::CheckerSet;
use kelpie_dst::mutations::LINEARIZABILITY;
use kelpie_dst::{
    swarm_faults, sweep_requests_max, LeaseEventKind, LeaseRunReport, LeaseScenario,
    LinearizabilityReport, LivenessBound, LivenessWindow, SwarmStore, LIVENESS,
    SWARM_COVERAGE_MARKS, SWARM_LEASE_FAULTS,
};
use kelpie_lease::coverage::COVERAGE_MARKS;
use kelpie_sim::{FaultConfig, FaultType, SimConfig, SimError, Simulation, Sweep, SweepEnd};

/// Seeds run when `DST_SEEDS` is not set.
const SEEDS_DEFAULT: u64 = 40;
/// The token of the hand-built liveness windows' grants.
const TOKEN: FencingToken = FencingToken(7);
/// Seeds a broken keeper may survive before the swarm must have caught it.
const MUTATION_SEEDS_MAX: u64 = 500;
/// Seeds a store serving stale reads may survive before the linearizability check must have
/// caught it.
const STALE_READ_SEEDS_MAX: u64 = 200;

/// A seed's outcome and the coverage marks it hit (taken on the thread that ran it).
type Marked = (
    Result<LeaseRunReport, SimError>,
    BTreeMap<&'static str, u64>,
);

fn run_seed_marked(seed: u64, scenario: LeaseScenario) -> Marked {
    let _ = kelpie_core::coverage::take_hits();
    let result = run_seed(seed, scenario);
    (result, kelpie_core::coverage::take_hits())
}

/// `count` seeds from `base` on every core.
fn sweep_from(base: u64, count: u64) -> Sweep {
    let jobs = std::thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN);
    Sweep::new(base, count).with_jobs(jobs)
}

/// Lease durations the swarm draws from, one per seed: short leases put network delay and
/// timeouts close to the lease, where keeper bugs show (a stale release was found at 200 ms).
const SWARM_LEASE_DURATIONS_MS: [u64; 3] = [200, 500, 1_000];

/// Seeds of the main sweep one seed of a 200-actor swarm costs about as much as.
const LARGE_SEED_COST: usize = 100;
/// Seeds of the large swarm when `DST_SEEDS` is not set.
const LARGE_SEEDS_DEFAULT: u64 = 10;

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
    let sweep = kelpie_sim::test_sweep(SEEDS_DEFAULT);
    let mut faults: BTreeMap<FaultType, u64> = BTreeMap::new();
    let mut marks: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut sim_ms, mut ops) = (0u64, 0u64);
    let (mut checked_ops, mut unanswered_ops, mut search_states) = (0, 0, 0);
    let (mut actors_checked, mut actors_by_log) = (0, 0);
    let job = |seed| run_seed_marked(seed, LeaseScenario::default());
    let stops = |(result, _): &Marked| result.is_err();
    let end = sweep.run(
        job,
        stops,
        || true,
        |seed, (result, seed_marks)| {
            let report = result.unwrap_or_else(|error| {
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
            for (mark, count) in seed_marks {
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
            actors_checked += checked.actors_checked;
            actors_by_log += checked.actors_linearized_by_store_log;
        },
    );
    let seeds_run = end.seeds_run();
    assert_eq!(end.seeds_run(), sweep.seeds_count(), "every seed ran");
    println!(
        "swarm: {} seeds, {} simulated s, {ops} lease operations, zero violations",
        seeds_run,
        sim_ms / 1000
    );
    println!(
        "  linearizable: {checked_ops} recorded operations ({unanswered_ops} unanswered), \
         {actors_by_log} of {actors_checked} actors' histories linearized by the store's log, \
         {search_states} search states for the rest"
    );
    for (fault, count) in &faults {
        println!("  fault {:<24} fired {count}", fault.name());
    }
    for (mark, count) in &marks {
        println!("  mark  {mark:<40} hit {count}");
    }
    if seeds_run >= SEEDS_DEFAULT {
        // Every fault of the mix fired somewhere in the sweep: a fault that silently stopped
        // firing would otherwise leave the sweep passing on a world without it.
        for fault in SWARM_LEASE_FAULTS {
            assert!(
                faults.get(fault).copied().unwrap_or(0) > 0,
                "fault {} never fired in {} seeds",
                fault.name(),
                seeds_run
            );
        }
        for mark in COVERAGE_MARKS.iter().chain(SWARM_COVERAGE_MARKS) {
            assert!(
                marks.contains_key(mark),
                "coverage mark {mark} never hit in {} seeds",
                seeds_run
            );
        }
    }
}

fn caught_within(broken: impl Fn(&mut LeaseScenario)) -> (u64, String) {
    caught_within_at(LeaseScenario::default(), broken)
}

fn caught_within_at(
    base_scenario: LeaseScenario,
    broken: impl Fn(&mut LeaseScenario),
) -> (u64, String) {
    let base = SimConfig::from_env_or_random().seed;
    let mut scenario = base_scenario;
    broken(&mut scenario);
    let mut caught = None;
    let end = sweep_from(base, MUTATION_SEEDS_MAX).run(
        |seed| run_seed(seed, scenario),
        Result::is_err,
        || true,
        |_, result| match result {
            Ok(_) => {}
            Err(SimError::InvariantViolated { invariant, .. }) => caught = Some(invariant),
            Err(other) => panic!("broken keeper failed otherwise: {other}"),
        },
    );
    match (end, caught) {
        (SweepEnd::Stopped { seeds_run, .. }, Some(invariant)) => (seeds_run, invariant),
        _ => panic!("a broken keeper survived {MUTATION_SEEDS_MAX} seeds from {base}"),
    }
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
    stale_reads_caught(LeaseScenario::default());
}

fn stale_reads_caught(base_scenario: LeaseScenario) {
    let base = SimConfig::from_env_or_random().seed;
    let mut scenario = base_scenario;
    scenario.bug_stale_reads = true;
    scenario.cluster.checkers = CheckerSet::NONE;
    let mut caught = None;
    let end = sweep_from(base, STALE_READ_SEEDS_MAX).run(
        |seed| run_seed(seed, scenario),
        Result::is_err,
        || true,
        |_, result| match result {
            Ok(_) => {}
            Err(SimError::InvariantViolated {
                invariant, message, ..
            }) if invariant == LINEARIZABILITY => caught = Some(message),
            Err(other) => panic!("the stale store failed otherwise: {other}"),
        },
    );
    let (SweepEnd::Stopped { seeds_run, .. }, Some(message)) = (end, caught) else {
        panic!("a store serving stale reads survived {STALE_READ_SEEDS_MAX} seeds from {base}");
    };
    assert!(
        message.contains("linearizability violation on actor-"),
        "the stale store failed otherwise: {message}"
    );
    assert!(message.contains("smallest offending window"), "{message}");
    println!("stale reads caught by the linearizability check after {seeds_run} seeds:");
    println!("{message}");
}

/// Checkers only watch: with none on, a run takes the same path, faults included, and
/// reports the same operations, counted from the store's decisions (before f932c0c only the
/// checkers' step cache counted them, and drained the store's decision log).
#[test]
fn test_a_run_without_checkers_takes_the_same_path_and_counts_every_operation() {
    let base = SimConfig::from_env_or_random().seed;
    let mut faults_fired = 0;
    for seed in base..base + 3 {
        let replay = kelpie_sim::reproduce_command(&SimConfig::new(seed));
        let checked = expect_pass(
            "every checker",
            seed,
            run_seed(seed, LeaseScenario::default()),
        );
        let mut scenario = LeaseScenario::default();
        scenario.cluster.checkers = CheckerSet::NONE;
        let unchecked = expect_pass("no checker", seed, run_seed(seed, scenario));
        let (ops, sim) = (&checked.ops, &checked.sim);
        assert!(ops.acquired > 0 && ops.renewed > 0, "{replay}");
        assert_eq!(unchecked.ops, checked.ops, "{replay}");
        assert_eq!(unchecked.sim.trace_hash, sim.trace_hash, "{replay}");
        assert_eq!(unchecked.sim.steps, sim.steps, "{replay}");
        assert_eq!(unchecked.sim.faults_fired, sim.faults_fired, "{replay}");
        assert!(sim.checks_evaluated > 0, "{replay}");
        assert_eq!(unchecked.sim.checks_evaluated, 0, "{replay}");
        faults_fired += sim.faults_fired.values().sum::<u64>();
    }
    assert!(
        faults_fired > 0,
        "no fault fired in seeds {base}..{}",
        base + 3
    );
}

/// A scenario of `nodes` nodes and `actors` actors with `sim_secs` of faulty phase.
fn sized(nodes: usize, actors: usize, sim_secs: u64) -> LeaseScenario {
    let mut scenario = LeaseScenario::default();
    scenario.nodes_count = nodes;
    scenario.actors_count = actors;
    scenario.sim_duration_ms = sim_secs * 1_000;
    scenario
}

fn expect_pass(what: &str, seed: u64, result: Result<LeaseRunReport, SimError>) -> LeaseRunReport {
    result.unwrap_or_else(|error| panic!("{what}, seed {seed}: {error}"))
}

/// Issue 19, seed 7 of `kelpie sim --nodes 5 --actors 200 --sim-secs 30 --faults none`, as a
/// hand-built timeline. Healed at 30,000 ms; node-3's first sweep (34 acquires, 29 releases)
/// reached actor-188 at 31,367 ms while node-2@1 still held it, node-2 released it later in
/// its own first sweep, and node-3's second sweep acquired it: belief started at 32,402 ms.
/// The old check watched for two lease durations after a 420 ms drain, sampling every 50 ms:
/// its window closed at 32,420 ms with the last sample at 32,370 ms, so it missed that belief,
/// and two sweeps of 40 wanted actors do not fit in two lease durations anyway. The bound of
/// the run is 9,217 ms, and the check counts a belief started at any instant up to it.
/// The liveness bound of the seed-7 run below (1 s leases, 5 % drift), with sweeps of
/// `sweep_requests_max` requests.
fn seed_7_bound(sweep_requests_max: u64) -> LivenessBound {
    LivenessBound {
        lease_duration_ms: 1_000,
        belief_duration_ms_max: 1_000,
        retry_interval_ms: 83,
        think_time_ms_max: 250,
        request_timeout_ms: 200,
        clock_drift_ppm_max: 50_000,
        network_latency_ms_max: 20,
        storage_latency_ms_max: 5,
        sweep_requests_max,
    }
}

#[test]
fn test_liveness_check_on_the_seed_7_timeline() {
    // The busiest node wants 40 actors and held 38 others at healing.
    let bound = seed_7_bound(sweep_requests_max(40, 38));
    // x' = ceil(x / 0.95) + 1: think 265, timeout 212, retry 89. R = 2·20 + 5 = 45.
    // D = 11·20 + 11·5 + 212 = 487; sweep = 265 + 79·45 = 3,820;
    // freed = max(3,820 + 45 + 1,000, 1,000 + 89 + 2·45) = 4,865; bound = 487 + 4,865 + 3,820 + 45.
    assert_eq!(bound.round_trip_ms(), 45);
    assert_eq!(bound.drain_ms(), 487);
    assert_eq!(bound.sweep_ms(), 3_820);
    assert_eq!(bound.total_ms(), 9_217);

    let heal_ms = 30_000;
    let actor = |i: u32| ActorId::new(format!("actor-{i}")).unwrap();
    let node = |name: &str| NodeId::new(name).unwrap();
    let mut window = LivenessWindow::new(heal_ms, bound);
    window.want(actor(187), node("node-2@1"));
    window.want(actor(188), node("node-3@1"));
    assert_eq!(window.deadline_ms(), 39_217);
    // actor-187 was held by node-2 through healing; actor-188 was refused at 31,380 ms.
    window.held(&actor(187), heal_ms, TOKEN);
    assert!(!window.all_held());
    window.held(&actor(188), 32_402, TOKEN);
    assert!(window.all_held());
    assert_eq!(window.check(), Ok(()));
    // Only the first time it is seen held counts.
    window.held(&actor(188), 40_000, TOKEN);
    assert_eq!(window.check(), Ok(()));

    // The deadline is inclusive, to the millisecond.
    let mut edge = LivenessWindow::new(heal_ms, bound);
    edge.want(actor(188), node("node-3@1"));
    edge.held(&actor(188), 39_217, TOKEN);
    assert_eq!(edge.check(), Ok(()));
    let mut late = LivenessWindow::new(heal_ms, bound);
    late.want(actor(188), node("node-3@1"));
    late.held(&actor(188), 39_218, TOKEN);
    let violation = late.check().unwrap_err();
    assert_eq!(violation.held_at_ms, Some(39_218));
    assert!(violation
        .to_string()
        .starts_with("liveness violation: actor-188, wanted by node-3@1"));

    // A node that never acquires an actor it wants is reported, whatever else was held.
    let mut never = LivenessWindow::new(heal_ms, bound);
    never.want(actor(187), node("node-2@1"));
    never.want(actor(188), node("node-3@1"));
    never.held(&actor(187), 30_500, TOKEN);
    let violation = never.check().unwrap_err();
    assert_eq!(
        (&violation.actor_id, violation.held_at_ms),
        (&actor(188), None)
    );
    assert!(violation.to_string().contains("never held"), "{violation}");
}

/// Held in time is not enough: each wanted actor must then be held by its node without a
/// break for longer than a single grant's belief lasts, with one token. Every way of missing
/// that is reported: not held when checked, held too briefly, held with another token.
#[test]
fn test_liveness_check_wants_each_actor_kept() {
    let bound = seed_7_bound(sweep_requests_max(1, 0));
    let (heal_ms, a, n) = (
        30_000,
        ActorId::new("a").unwrap(),
        NodeId::new("n@1").unwrap(),
    );
    let mut window = LivenessWindow::new(heal_ms, bound);
    window.want(a.clone(), n);
    // 1,000 ms on the slowest clock: ceil(1,000 / 0.95) + 1.
    assert_eq!(window.kept_ms(), 1_054);
    // On etcd `L` is how long a lease nobody renews keeps its actor (the lease, the session's
    // TTL, a pass of the revoke loop); a belief still ends within the configured lease.
    let etcd = LivenessBound {
        lease_duration_ms: 2_500,
        ..bound
    };
    assert_eq!(LivenessWindow::new(heal_ms, etcd).kept_ms(), 1_054);
    assert_eq!(window.kept_deadline_ms(), window.deadline_ms() + 1_054);
    assert_eq!(window.kept_at_ms(), None, "not held yet");
    let other = FencingToken(TOKEN.0 + 1);
    window.held(&a, 30_100, TOKEN);
    assert_eq!(window.kept_at_ms(), Some(31_154));
    window.held(&a, 30_600, TOKEN);
    assert_eq!(window.kept_at_ms(), Some(31_154), "the same token goes on");
    let holds = |token: Option<FencingToken>| move |_: &ActorId| token;
    assert!(window.check_kept(31_154, holds(Some(TOKEN))).is_ok());
    let short = window.check_kept(31_153, holds(Some(TOKEN))).unwrap_err();
    assert_eq!(
        short.not_kept.map(|k| k.held_since),
        Some(Some((30_100, TOKEN)))
    );
    assert!(short.to_string().contains("but not kept"), "{short}");
    assert!(window.check_kept(40_000, holds(None)).is_err(), "let go");
    assert!(
        window.check_kept(40_000, holds(Some(other))).is_err(),
        "another grant"
    );
    // A break seen by a visit starts the stretch again.
    window.unheld(&a);
    assert_eq!(window.kept_at_ms(), None);
    assert!(window.check_kept(40_000, holds(Some(TOKEN))).is_err());
    window.held(&a, 32_000, other);
    assert_eq!(window.kept_at_ms(), Some(33_054));
    assert!(window.check_kept(33_054, holds(Some(other))).is_ok());
    assert_eq!(window.check(), Ok(()), "first held in time all the same");
}

/// An app that lets go of each actor as soon as it is granted gets every actor held for a
/// moment, which a check of "held once" passed: the liveness check reports it not kept.
#[test]
fn test_swarm_reports_an_app_that_lets_go() {
    for seed in [1, 2, 3] {
        let mut scenario = sized(3, 30, 5);
        scenario.bug_app_lets_go = true;
        let message = liveness_failure(seed, scenario);
        assert!(message.contains("but not kept"), "seed {seed}: {message}");
    }
}

/// A store that dies at healing: an actor held then stays believed until its belief runs
/// out, and none is renewed or held again. Where every actor was held by its node at healing,
/// a check of "held once" passed at once; the liveness check reports it not kept. (Without
/// faults, at 3 nodes and 2 actors, that is 2 of seeds 1 to 10: each seed here must fail, and
/// those where every actor was held at healing fail for not keeping it.)
#[test]
fn test_swarm_reports_a_store_dead_after_healing() {
    let mut not_kept = 0;
    for seed in 1..=10 {
        let mut scenario = sized(3, 2, 5);
        scenario.bug_store_dies_at_heal = true;
        let message = liveness_failure(seed, scenario);
        if message.contains("but not kept") {
            not_kept += 1;
        } else {
            assert!(message.contains("never held"), "seed {seed}: {message}");
        }
    }
    assert!(
        not_kept >= 1,
        "{not_kept} of 10 seeds held every actor at healing"
    );
}

/// A fault is counted where it took effect, not where it was drawn: a crash drawn for a node
/// already down, or for a store already down, did nothing. They were counted (node-crash 1,029
/// where 844 crashes happened over `kelpie sim --seeds 200`), and on etcd each leader loss
/// twice. The fault log of a run with crashes drawn at every tick says what took effect.
#[test]
fn test_faults_are_counted_where_they_took_effect() {
    let crashes = [FaultType::NodeCrash, FaultType::StorageCrash];
    for store in [SwarmStore::Protocol, SwarmStore::Etcd] {
        for seed in 1..=3 {
            let mut scenario = sized(3, 4, 5);
            scenario.cluster.store = store;
            let simulation = crashes.iter().fold(
                Simulation::new(SimConfig::new(seed)),
                |simulation, fault| simulation.with_fault(FaultConfig::new(*fault, 0.5).unwrap()),
            );
            let (result, events) = scenario.run_recorded(simulation);
            let report = expect_pass("crashes at every other tick", seed, result);
            let fired = |fault| report.sim.faults_fired.get(&fault).copied().unwrap_or(0);
            let logged = |what: &dyn Fn(&str) -> bool| {
                events
                    .iter()
                    .filter(|e| matches!(&e.kind, LeaseEventKind::Fault { what: w } if what(w)))
                    .count() as u64
            };
            let node_crashes = logged(&|w| w.starts_with("crash node-"));
            let (store_crashes, drawn) = match store {
                SwarmStore::Etcd => {
                    let lost = logged(&|w| w.starts_with("etcd leader lost"));
                    (lost, lost)
                }
                _ => {
                    // Only a crash of a store that is up takes effect.
                    let (mut up, mut crashed) = (true, 0);
                    for event in &events {
                        if let LeaseEventKind::Fault { what } = &event.kind {
                            match what.as_str() {
                                "storage crash" => {
                                    crashed += u64::from(up);
                                    up = false;
                                }
                                "storage restart" => up = true,
                                _ => {}
                            }
                        }
                    }
                    (crashed, logged(&|w| w == "storage crash"))
                }
            };
            let what = format!("{store:?} seed {seed}");
            assert!(node_crashes > 0 && store_crashes > 0, "{what}: no crash");
            assert_eq!(fired(FaultType::NodeCrash), node_crashes, "{what}");
            assert_eq!(fired(FaultType::StorageCrash), store_crashes, "{what}");
            if store == SwarmStore::Protocol {
                assert!(
                    drawn > store_crashes,
                    "{what}: no crash of a crashed store drawn"
                );
            }
        }
    }
}

/// The message of the liveness violation `scenario` must fail `seed` with.
fn liveness_failure(seed: u64, scenario: LeaseScenario) -> String {
    let config = SimConfig::new(seed).with_failure_banner(false);
    match scenario.run(Simulation::new(config)) {
        Err(SimError::InvariantViolated {
            invariant, message, ..
        }) if invariant == LIVENESS => message,
        other => panic!("seed {seed}: no liveness violation: {other:?}"),
    }
}

/// Issue 19: 5 nodes and 200 actors. Seeds 2, 7 and 8 without faults are the ones that
/// reported liveness violations (`kelpie sim --nodes 5 --actors 200 --sim-secs 30 --faults
/// none`); two more seeds run the swarm's faults and lease durations.
#[test]
fn test_swarm_200_actors_reach_liveness() {
    for seed in [2, 7, 8] {
        let simulation = Simulation::new(SimConfig::new(seed));
        expect_pass(
            "200 actors, no faults",
            seed,
            sized(5, 200, 30).run(simulation),
        );
    }
    // A 200-actor seed costs about as much as a hundred of the main sweep's, so a DST_SEEDS
    // sweep runs one of these per hundred of those (at least two).
    let seeds = kelpie_sim::test_seeds(2);
    let count = (seeds.len() / LARGE_SEED_COST).clamp(2.min(seeds.len()), seeds.len());
    for seed in seeds.into_iter().take(count) {
        expect_pass("200 actors, swarm", seed, run_seed(seed, sized(5, 200, 10)));
    }
}

/// A node that never acquires the actors it wants fails the run with a liveness violation
/// naming it: the bound is a deadline, not a formality. (Node 0 wants 10 of the 30 actors; an
/// actor it already held at healing counts as held, the others are never held.)
#[test]
fn test_swarm_reports_a_node_that_never_acquires() {
    for seed in [1, 2, 3] {
        let mut scenario = sized(3, 30, 5);
        scenario.bug_node_never_acquires = true;
        let config = SimConfig::new(seed).with_failure_banner(false);
        let message = match scenario.run(Simulation::new(config)) {
            Err(SimError::InvariantViolated {
                invariant, message, ..
            }) if invariant == LIVENESS => message,
            other => panic!("seed {seed}: an idle node was not reported: {other:?}"),
        };
        assert!(
            message.contains("liveness violation: actor-")
                && message.contains(", wanted by node-0@1, ")
                && message.contains("never held"),
            "seed {seed}: {message}"
        );
    }
}

/// The large swarm: 20 nodes, 1,000 actors, each seed with its own fault mix and lease
/// duration. `cargo test -p kelpie-dst --release --test swarm_dst -- --ignored --nocapture`.
#[test]
#[ignore = "large: 20 nodes, 1,000 actors; run with --release -- --ignored"]
fn test_swarm_20_nodes_1000_actors() {
    let sweep = kelpie_sim::test_sweep(LARGE_SEEDS_DEFAULT);
    let mut sim_ms = 0;
    let end = sweep.run(
        |seed| run_seed(seed, sized(20, 1_000, 30)),
        Result::is_err,
        || true,
        |seed, result| {
            let report = expect_pass("20 nodes, 1,000 actors", seed, result);
            sim_ms += report.sim.sim_time_ms;
        },
    );
    let seeds_run = end.seeds_run();
    println!(
        "large swarm: {} seeds of 20 nodes and 1,000 actors, {} simulated s, zero violations",
        seeds_run,
        sim_ms / 1_000
    );
}

/// The broken keepers are still caught with 20 nodes and 1,000 actors.
/// `cargo test -p kelpie-dst --release --test swarm_dst -- --ignored --nocapture`.
#[test]
#[ignore = "large: 20 nodes, 1,000 actors; run with --release -- --ignored"]
fn test_swarm_20_nodes_1000_actors_catches_broken_keepers() {
    let large = sized(20, 1_000, 30);
    let beliefs = ["BeliefConsistency", "LeaseUniqueness"];
    let (seeds, invariant) = caught_within_at(large, |s| s.bug_belief_from_reply = true);
    println!("large swarm: belief-from-reply caught by {invariant} after {seeds} seeds");
    assert!(beliefs.contains(&invariant.as_str()), "{invariant}");
    let (seeds, invariant) = caught_within_at(large, |s| s.bug_no_drift_margin = true);
    println!("large swarm: no-drift-margin caught by {invariant} after {seeds} seeds");
    assert!(beliefs.contains(&invariant.as_str()), "{invariant}");
    stale_reads_caught(large);
}

/// Issue 16: a sweep at 20 nodes and 1,000 actors once failed liveness within its first five
/// seeds (an actor released near the end of the faulty phase was not held again within two
/// lease durations: the old bound, which a sweep over a node's 50 wanted actors cannot meet;
/// issue 19 replaced it with the bound of `lease_swarm`). Two swarm seeds at that size, with
/// every checker on, must reach liveness within the bound; the ignored test below sweeps more.
#[test]
fn test_swarm_20_nodes_1000_actors_reach_liveness() {
    for seed in [1, 2] {
        let report = expect_pass(
            "20 nodes, 1,000 actors",
            seed,
            run_seed(seed, sized(20, 1_000, 10)),
        );
        let checked = report.linearizability.expect("the history was checked");
        assert!(checked.actors_checked > 500, "seed {seed}: {checked:?}");
    }
}

/// The largest size of the README's scale table: 50 nodes and 10,000 actors, a few seeds with
/// their own fault mixes and lease durations, every checker on.
/// `DST_SEEDS=3 cargo test -p kelpie-dst --release --test swarm_dst -- --ignored
/// test_swarm_50_nodes_10000_actors --nocapture` (a few CPU seconds per seed).
#[test]
#[ignore = "large: 50 nodes, 10,000 actors; run with --release -- --ignored"]
fn test_swarm_50_nodes_10000_actors() {
    let mut sim_ms = 0;
    let seeds = kelpie_sim::test_seeds(2);
    for &seed in &seeds {
        let report = expect_pass(
            "50 nodes, 10,000 actors",
            seed,
            run_seed(seed, sized(50, 10_000, 30)),
        );
        let checked = report.linearizability.expect("the history was checked");
        assert!(checked.actors_checked > 5_000, "seed {seed}: {checked:?}");
        sim_ms += report.sim.sim_time_ms;
    }
    println!(
        "largest swarm: {} seeds of 50 nodes and 10,000 actors, {} simulated s, zero violations",
        seeds.len(),
        sim_ms / 1_000
    );
}

/// The store's log saves the search and changes nothing else: the same seeds with and without
/// it take the same path and pass with the same operations checked. With it, nearly every
/// actor's history is linearized by one replay of the log (a pairing it gets wrong falls back
/// to the search); without it, every actor is searched, so the search still runs on real
/// swarm histories.
#[test]
fn test_swarm_histories_pass_the_search_alone_as_with_the_store_log() {
    let base = SimConfig::from_env_or_random().seed;
    for seed in base..base + 4 {
        let replay = kelpie_sim::reproduce_command(&SimConfig::new(seed));
        let logged = expect_pass("store log", seed, run_seed(seed, LeaseScenario::default()));
        let mut scenario = LeaseScenario::default();
        scenario.linearize_from_store_log = false;
        let searched = expect_pass("search alone", seed, run_seed(seed, scenario));
        assert_eq!(logged.sim.trace_hash, searched.sim.trace_hash, "{replay}");
        let with_log = logged.linearizability.expect("checked with the log");
        let alone = searched.linearizability.expect("checked by the search");
        let covered = |r: &LinearizabilityReport| {
            (r.actors_checked, r.operations_checked, r.unknown_operations)
        };
        assert_eq!(covered(&with_log), covered(&alone), "{replay}");
        assert_eq!(alone.actors_linearized_by_store_log, 0, "{replay}");
        assert!(alone.states_explored > 0, "{replay}: {alone:?}");
        assert!(
            with_log.actors_linearized_by_store_log * 10 >= with_log.actors_checked * 9,
            "{replay}: {with_log:?}"
        );
        assert!(with_log.states_explored < alone.states_explored, "{replay}");
    }
}
