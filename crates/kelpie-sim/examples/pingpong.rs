//! The standard ping workload, as a speed benchmark of the simulator.
//!
//! N simulated hosts; every `--every-ms` of simulated time each host pings every other host,
//! which answers with a pong. Each message's latency is uniform in 1..=20 ms. For the middle
//! third of the run the hosts are split into two halves that cannot reach each other, then
//! healed. Prints one line:
//! `delivered=<n> sim_secs=<s> cpu_secs=<s> ns_per_msg=<n> trace_hash=<hex>`.
//!
//! ```text
//! cargo run --release -p kelpie-sim --example pingpong -- --hosts 10 --sim-secs 120 --every-ms 100 --seed 42
//! ```

use kelpie_sim::{HostId, NetworkConfig, SimConfig, SimEnv, SimNetwork, Simulation};
use std::cell::Cell;
use std::rc::Rc;

/// Shortest message latency in the standard workload.
const PING_LATENCY_MS_MIN: u64 = 1;
/// Longest message latency in the standard workload.
const PING_LATENCY_MS_MAX: u64 = 20;
/// Simulated time allowed past the end of the workload before the run counts as stuck.
const RUN_SLACK_MS: u64 = 1_000;

/// The workload's parameters.
#[derive(Debug, Clone, Copy)]
struct Args {
    hosts: usize,
    sim_secs: u64,
    every_ms: u64,
    seed: u64,
}

/// A ping, carrying the pinger's sequence number, or its answer.
#[derive(Debug, Clone, Copy)]
enum Message {
    Ping(u64),
    Pong,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        hosts: 10,
        sim_secs: 120,
        every_ms: 100,
        seed: 42,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag} {v:?} is not a number"))
        };
        match flag.as_str() {
            "--hosts" => {
                args.hosts = usize::try_from(number(&value)?).map_err(|e| e.to_string())?
            }
            "--sim-secs" => args.sim_secs = number(&value)?,
            "--every-ms" => args.every_ms = number(&value)?,
            "--seed" => args.seed = number(&value)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.hosts < 2 || args.every_ms == 0 || args.sim_secs == 0 {
        return Err("need --hosts >= 2, --every-ms >= 1 and --sim-secs >= 1".to_string());
    }
    Ok(args)
}

/// CPU time this process has used, in ns. The example runs outside the simulated world, so
/// it may read the real (CPU) clock.
fn process_cpu_ns() -> u128 {
    cpu_time::ProcessTime::now().as_duration().as_nanos()
}

/// Answers every ping with a pong.
async fn responder(network: SimNetwork<Message>, host: HostId) {
    loop {
        let (from, message) = network.recv(host).await;
        if let Message::Ping(_sequence) = message {
            network.send(host, from, Message::Pong);
        }
    }
}

/// Pings every other host every `every_ms` until `run_ms`.
async fn pinger(env: SimEnv, network: SimNetwork<Message>, host: HostId, args: Args) {
    let run_ms = args.sim_secs * 1_000;
    let mut sequence = 0;
    loop {
        env.sleep_ms(args.every_ms).await;
        if env.now_ms() >= run_ms {
            return;
        }
        for to in (0..args.hosts).filter(|&to| to != host) {
            network.send(host, to, Message::Ping(sequence));
        }
        sequence += 1;
    }
}

/// Splits the hosts into two halves for the middle third of the run, then heals.
async fn partitioner(env: SimEnv, network: SimNetwork<Message>, args: Args) {
    let third_ms = args.sim_secs * 1_000 / 3;
    let hosts: Vec<HostId> = (0..args.hosts).collect();
    let (left, right) = hosts.split_at(args.hosts / 2);
    env.sleep_ms(third_ms).await;
    network.partition(left, right);
    env.sleep_ms(third_ms).await;
    network.heal();
}

async fn workload(env: SimEnv, args: Args, delivered: Rc<Cell<u64>>) -> Result<(), String> {
    let config = NetworkConfig {
        hosts: args.hosts,
        latency_ms_min: PING_LATENCY_MS_MIN,
        latency_ms_max: PING_LATENCY_MS_MAX,
        mailbox_capacity: kelpie_sim::NETWORK_MAILBOX_CAPACITY_DEFAULT,
    };
    let network = SimNetwork::with_config(&env, config);
    for host in 0..args.hosts {
        drop(env.spawn(responder(network.clone(), host)));
        drop(env.spawn(pinger(env.clone(), network.clone(), host, args)));
    }
    drop(env.spawn(partitioner(env.clone(), network.clone(), args)));
    env.sleep_ms(args.sim_secs * 1_000).await;
    delivered.set(network.delivered());
    Ok(())
}

fn main() {
    let args = parse_args().unwrap_or_else(|message| {
        eprintln!("{message}\nusage: pingpong --hosts N --sim-secs S --every-ms E --seed SEED");
        std::process::exit(2);
    });
    let command = format!(
        "cargo run --release -p kelpie-sim --example pingpong -- --hosts {} --sim-secs {} \
         --every-ms {} --seed {}",
        args.hosts, args.sim_secs, args.every_ms, args.seed
    );
    let config = SimConfig::new(args.seed)
        .with_steps_max(u64::MAX)
        .with_sim_time_ms_max(args.sim_secs * 1_000 + RUN_SLACK_MS)
        .with_reproduce_command(command);
    let delivered = Rc::new(Cell::new(0));
    let cpu_start_ns = process_cpu_ns();
    let slot = delivered.clone();
    let report = Simulation::new(config).run(|env| workload(env, args, slot.clone()));
    let cpu_ns = process_cpu_ns() - cpu_start_ns;
    let report = report.unwrap_or_else(|_| std::process::exit(1));
    let delivered = delivered.get();
    println!(
        "delivered={delivered} sim_secs={} cpu_secs={:.3} ns_per_msg={} trace_hash={:016x}",
        report.sim_time_ms as f64 / 1_000.0,
        cpu_ns as f64 / 1e9,
        cpu_ns / u128::from(delivered.max(1)),
        report.trace_hash
    );
}
