//! The swarm scenario's speed: `cargo run --release -p kelpie-dst --example swarm_bench`.
//!
//! Runs the networked lease scenario (5 nodes, 100 actors, 1 s leases, 60 simulated seconds of
//! safety phase per seed, then healing and the liveness phase) with each seed's swarm fault
//! mix, and prints seeds per CPU second and time compression (simulated seconds per CPU
//! second). Options: `--seeds N` (default 20), `--seed S` (first seed, default 1).

use kelpie_dst::{swarm_faults, LeaseScenario, SWARM_LEASE_FAULTS};
use kelpie_sim::{SimConfig, Simulation};

/// CPU time this process has used; the benchmark runs outside the simulated world.
fn cpu_secs() -> f64 {
    cpu_time::ProcessTime::now().as_duration().as_secs_f64()
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    let value = args
        .iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1));
    value.map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} takes a number"))
    })
}

fn main() {
    let (seeds, first_seed) = (arg("--seeds", 20), arg("--seed", 1));
    let mut scenario = LeaseScenario::default();
    scenario.nodes_count = 5;
    scenario.actors_count = 100;
    scenario.sim_duration_ms = 60_000;
    scenario.cluster.lease_duration_ms = 1_000;
    let (mut sim_ms, mut steps, mut ops) = (0u64, 0u64, 0u64);
    let start_secs = cpu_secs();
    for seed in first_seed..first_seed + seeds {
        let mut simulation = Simulation::new(SimConfig::new(seed));
        for fault in swarm_faults(seed, SWARM_LEASE_FAULTS) {
            simulation = simulation.with_fault(fault);
        }
        let report = scenario.run(simulation).unwrap_or_else(|e| panic!("{e}"));
        sim_ms += report.sim.sim_time_ms;
        steps += report.sim.steps;
        ops += report.ops.total();
    }
    let cpu = cpu_secs() - start_secs;
    println!(
        "seeds={seeds} nodes=5 actors=100 lease_ms=1000 sim_secs={:.0} cpu_secs={cpu:.2} \
         seeds_per_cpu_sec={:.2} time_compression={:.0} steps={steps} lease_ops={ops}",
        sim_ms as f64 / 1000.0,
        seeds as f64 / cpu,
        sim_ms as f64 / 1000.0 / cpu
    );
}
