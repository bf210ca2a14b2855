//! The swarm scenario's speed: `cargo run --release -p kelpie-dst --example swarm_bench`.
//!
//! Runs the networked lease scenario with each seed's swarm fault mix and every checker on,
//! one seed after another on one core, and prints one line: time compression (simulated
//! seconds per CPU second), seeds per CPU second, CPU ns per executor step and per lease
//! operation, how many actors' histories the linearizability check had to search (the rest the
//! store's log linearized), and the number of seeds that failed (each failure is printed with
//! its seed).
//!
//! Options (defaults in brackets): `--nodes N` [5], `--actors N` [100], `--lease-ms N` [1000],
//! `--sim-secs N` (the safety phase; healing and the liveness phase follow) [60],
//! `--seeds N` [20], `--seed S` (first seed) [1].

use kelpie_dst::{swarm_faults, LeaseScenario, SWARM_LEASE_FAULTS};
use kelpie_sim::{SimConfig, Simulation};

/// The allocator `kelpie sim` runs on, so the figures are the sweep's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU time this process has used; the benchmark runs outside the simulated world.
fn cpu_secs() -> f64 {
    cpu_time::ProcessTime::now().as_duration().as_secs_f64()
}

/// The value of `--name`, or `default`. Exits with a message on a value that is not a number.
fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    let value = args
        .iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1));
    value.map_or(default, |v| {
        v.parse().unwrap_or_else(|_| {
            eprintln!("{name} takes a number, not {v:?}");
            std::process::exit(2)
        })
    })
}

fn main() {
    // As `kelpie sim` does.
    kelpie_dst::allocator::set_sweep_policy();
    let (seeds, first_seed) = (arg("--seeds", 20), arg("--seed", 1));
    let mut scenario = LeaseScenario::default();
    scenario.nodes_count = arg("--nodes", 5) as usize;
    scenario.actors_count = arg("--actors", 100) as usize;
    scenario.sim_duration_ms = arg("--sim-secs", 60) * 1_000;
    scenario.cluster.lease_duration_ms = arg("--lease-ms", 1_000);
    let (mut sim_ms, mut steps, mut ops, mut failed) = (0u64, 0u64, 0u64, 0u64);
    let (mut actors_checked, mut actors_searched) = (0, 0);
    let start_secs = cpu_secs();
    for seed in first_seed..first_seed + seeds {
        let mut simulation = Simulation::new(SimConfig::new(seed));
        for fault in swarm_faults(seed, SWARM_LEASE_FAULTS) {
            simulation = simulation.with_fault(fault);
        }
        match scenario.run(simulation) {
            Ok(report) => {
                sim_ms += report.sim.sim_time_ms;
                steps += report.sim.steps;
                ops += report.ops.total();
                if let Some(checked) = report.linearizability {
                    actors_checked += checked.actors_checked;
                    actors_searched +=
                        checked.actors_checked - checked.actors_linearized_by_store_log;
                }
            }
            Err(error) => {
                failed += 1;
                eprintln!("seed {seed} failed: {error}");
            }
        }
    }
    let cpu = cpu_secs() - start_secs;
    let per = |count: u64| cpu * 1e9 / count.max(1) as f64;
    println!(
        "seeds={seeds} nodes={} actors={} lease_ms={} sim_secs={:.0} cpu_secs={cpu:.2} \
         seeds_per_cpu_sec={:.2} time_compression={:.0} steps={steps} lease_ops={ops} \
         ns_per_step={:.0} ns_per_lease_op={:.0} actors_searched={actors_searched}/{actors_checked} \
         failed={failed}",
        scenario.nodes_count,
        scenario.actors_count,
        scenario.cluster.lease_duration_ms,
        sim_ms as f64 / 1000.0,
        seeds as f64 / cpu,
        sim_ms as f64 / 1000.0 / cpu,
        per(steps),
        per(ops),
    );
}
