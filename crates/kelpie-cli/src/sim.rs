//! `kelpie sim`: the lease scenario in the deterministic simulator over many seeds.
//!
//! Every seed is a complete, reproducible run: nodes acquire, renew and release leases on a
//! few contended actors through the production protocol while faults fire and the TLA+
//! invariants are checked after every step. The sweep stops at the first failing seed, prints
//! how to replay it, and exits 1; the replay is that one seed, so there is nothing to gain
//! from running further seeds first.

use std::io::Write;
use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::Args;
use kelpie_core::limits::{LEASE_DURATION_MS_MAX, LEASE_DURATION_MS_MIN};
use kelpie_dst::mutations::Mutation;
use kelpie_dst::{LeaseEvent, LeaseRunReport, LeaseScenario};
use kelpie_lease::machine::BeliefConfig;
use kelpie_sim::{FaultConfig, SimConfig, SimError};
use kelpie_sim::{Simulation, SIM_STEPS_MAX_DEFAULT};
use rand::RngCore;

use crate::error::CliError;
use crate::faults::{describe, FaultPlan};
use crate::progress::Progress;
use crate::report::{self, Totals};
use crate::timeline;
use crate::timing::Stopwatch;

/// Seeds run when neither `--seed`, `--seeds` nor `DST_SEED` is given.
pub const SEEDS_DEFAULT: u64 = 100;
/// Most seeds one invocation runs.
pub const SEEDS_MAX: u64 = 1_000_000;
/// Most simulated nodes.
pub const NODES_MAX: u64 = 64;
/// Most contended actors.
pub const ACTORS_MAX: u64 = 1_000;
/// Longest simulated run per seed, in seconds (one hour).
pub const SIM_SECS_MAX: u64 = 3_600;
/// Executor steps allowed per node per simulated second, far above what the scenario takes
/// (a node makes a few requests per second, each a handful of steps); the bound only stops a
/// run that livelocks.
const STEPS_PER_NODE_SECOND_MAX: u64 = 20_000;

const SIM_AFTER_HELP: &str = "\
Seeds: --seed S runs one seed (a replay); --seeds N runs --base-seed B, B+1, ... B+N-1, with a
random base printed on stderr when --base-seed is not given. With neither, DST_SEED (if set)
is the one seed, otherwise 100 seeds run.

Faults: swarm (the default) draws a mix per seed; none; or a list like
storage-write-fail=0.1,partition=0.05 (a unique suffix of a fault's name is enough).

Output: the report goes to stdout and depends only on the options and seeds, so two runs of
the same --seed print identical stdout. Progress and timing (wall and CPU time, simulated
events per CPU second, time compression) go to stderr.

On the first failing seed the run stops and exits 1. stdout then starts with DST_SEED=<n>,
followed by the exact command that replays it, the invariant, the step, the message and the
last events before it (with --json, the same as fields of the JSON object, and DST_SEED=<n>
with the replay command go first to stderr).

Exit codes: 0 no violation, 1 a seed failed, 2 bad usage.";

/// Options of `kelpie sim`.
#[derive(Debug, Args)]
#[command(after_help = SIM_AFTER_HELP)]
pub struct SimArgs {
    /// Run this many seeds, from --base-seed upwards.
    #[arg(
        long,
        value_name = "N",
        conflicts_with = "seed",
        value_parser = clap::value_parser!(u64).range(1..=SEEDS_MAX)
    )]
    pub seeds: Option<u64>,
    /// Run exactly this seed (to replay a failure).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// The first seed of a --seeds run [default: random, printed on stderr].
    #[arg(long, value_name = "B", conflicts_with = "seed")]
    pub base_seed: Option<u64>,
    /// Simulated nodes contending for leases.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=NODES_MAX))]
    pub nodes: u64,
    /// Actors they contend for.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=ACTORS_MAX))]
    pub actors: u64,
    /// Lease duration on the store's clock, in ms.
    #[arg(
        long,
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u64)
            .range(LEASE_DURATION_MS_MIN..=LEASE_DURATION_MS_MAX)
    )]
    pub lease_ms: u64,
    /// Simulated seconds per seed.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=SIM_SECS_MAX))]
    pub sim_secs: u64,
    /// Faults to inject: swarm, none, or NAME=PROBABILITY,...
    #[arg(long, default_value = "swarm", value_name = "LIST")]
    pub faults: FaultPlan,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write an HTML page with an SVG timeline of the run (needs --seed).
    #[arg(
        long,
        value_name = "FILE.html",
        requires = "seed",
        conflicts_with_all = ["seeds", "base_seed"]
    )]
    pub timeline: Option<PathBuf>,
    /// Replace the protocol's decision with a deliberately broken one, to show the checkers
    /// catch it.
    #[arg(
        long,
        hide = true,
        value_name = "NAME",
        value_parser = clap::builder::PossibleValuesParser::new(Mutation::ALL.map(Mutation::name))
            .map(|name| Mutation::from_name(&name).expect("offered names are mutations"))
    )]
    pub inject_bug: Option<Mutation>,
}

/// The settings every seed of one invocation shares.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Simulated nodes.
    pub nodes: u64,
    /// Contended actors.
    pub actors: u64,
    /// Lease duration, ms.
    pub lease_ms: u64,
    /// Simulated seconds per seed.
    pub sim_secs: u64,
    /// The faults.
    pub faults: FaultPlan,
    /// The broken protocol, if any.
    pub inject_bug: Option<Mutation>,
}

/// One finished seed.
#[derive(Debug)]
pub struct SeedRun {
    /// The seed.
    pub seed: u64,
    /// The faults it ran with.
    pub faults: Vec<FaultConfig>,
    /// The command that replays it.
    pub replay: String,
    /// Its report, or why it failed.
    pub result: Result<LeaseRunReport, SimError>,
    /// Its events (the most recent ones, if there were very many).
    pub events: Vec<LeaseEvent>,
}

impl RunSettings {
    fn from_args(args: &SimArgs) -> Result<Self, CliError> {
        let settings = Self {
            nodes: args.nodes,
            actors: args.actors,
            lease_ms: args.lease_ms,
            sim_secs: args.sim_secs,
            faults: args.faults.clone(),
            inject_bug: args.inject_bug,
        };
        // Checked here so that a bad combination is a usage error, not a failed seed.
        let cluster = settings.scenario().cluster;
        BeliefConfig::new(
            cluster.lease_duration_ms,
            cluster.clock_drift_ppm_max,
            cluster.safety_margin_ms,
        )?;
        Ok(settings)
    }

    /// The scenario every seed runs.
    pub fn scenario(&self) -> LeaseScenario {
        let mut scenario = LeaseScenario::default();
        scenario.nodes_count = usize::try_from(self.nodes).expect("bounded by NODES_MAX");
        scenario.actors_count = usize::try_from(self.actors).expect("bounded by ACTORS_MAX");
        scenario.sim_duration_ms = self.sim_secs * 1_000;
        scenario.cluster = scenario.cluster_with_lease_duration_ms(self.lease_ms);
        if let Some(mutation) = self.inject_bug {
            mutation.apply(&mut scenario);
        }
        scenario
    }

    /// The command that replays `seed` exactly: every option that shapes the run, with the
    /// faults resolved to the explicit list the seed used, so the replay does not depend on
    /// defaults or on how a swarm draws.
    pub fn replay_command(&self, seed: u64, faults: &[FaultConfig]) -> String {
        let mut command = format!(
            "kelpie sim --seed {seed} --nodes {} --actors {} --lease-ms {} --sim-secs {} \
             --faults {}",
            self.nodes,
            self.actors,
            self.lease_ms,
            self.sim_secs,
            describe(faults)
        );
        if let Some(mutation) = self.inject_bug {
            command.push_str(&format!(" --inject-bug {}", mutation.name()));
        }
        command
    }

    /// Runs one seed, recording its lease events only if `record` (a timeline, or the
    /// re-run of a failed seed for its report): a sweep's passing seeds are never read.
    pub fn run_seed(&self, seed: u64, record: bool) -> SeedRun {
        let faults = self.faults.resolve(seed);
        let replay = self.replay_command(seed, &faults);
        let steps_max =
            (STEPS_PER_NODE_SECOND_MAX * self.nodes * self.sim_secs).max(SIM_STEPS_MAX_DEFAULT);
        let config = SimConfig::new(seed)
            .with_steps_max(steps_max)
            .with_reproduce_command(replay.clone())
            // The command prints DST_SEED and the replay command first itself, on stdout.
            .with_failure_banner(false);
        let simulation = faults
            .iter()
            .fold(Simulation::new(config), |sim, fault| sim.with_fault(*fault));
        let (result, events) = if record {
            self.scenario().run_recorded(simulation)
        } else {
            (self.scenario().run(simulation), Vec::new())
        };
        SeedRun {
            seed,
            faults,
            replay,
            result,
            events,
        }
    }
}

/// Which seeds to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeedPlan {
    Single(u64),
    Sweep { base: u64, count: u64 },
}

fn seed_plan(args: &SimArgs) -> Result<SeedPlan, CliError> {
    if let Some(seed) = args.seed {
        return Ok(SeedPlan::Single(seed));
    }
    if args.seeds.is_none() && args.base_seed.is_none() {
        let from_env = SimConfig::seed_from_env().map_err(|e| CliError::Usage(e.to_string()))?;
        if let Some(seed) = from_env {
            return Ok(SeedPlan::Single(seed));
        }
    }
    // The one place real randomness enters: it only picks which seeds run, and the base is
    // printed so the sweep can be repeated.
    // Drawn below 2^32 so that it is short to read and type; any u64 is accepted.
    let base = args
        .base_seed
        .unwrap_or_else(|| u64::from(rand::rngs::OsRng.next_u32()));
    Ok(SeedPlan::Sweep {
        base,
        count: args.seeds.unwrap_or(SEEDS_DEFAULT),
    })
}

/// Runs `kelpie sim`; `Ok(false)` when a seed failed.
pub fn run(args: SimArgs) -> Result<bool, CliError> {
    let settings = RunSettings::from_args(&args)?;
    let plan = seed_plan(&args)?;
    let stopwatch = Stopwatch::start();
    let (base, count) = match plan {
        SeedPlan::Single(seed) => (seed, 1),
        SeedPlan::Sweep { base, count } => {
            eprintln!(
                "kelpie sim: {count} seeds from base seed {base} (repeat with --base-seed {base})"
            );
            (base, count)
        }
    };
    let (totals, kept) = sweep(&settings, base, count, args.timeline.is_some());
    let elapsed = stopwatch.elapsed();
    let failure = kept.as_ref().filter(|run| run.result.is_err());
    if let (true, Some(run)) = (args.json, failure) {
        // stdout is one JSON object; the replay instructions still come first, on stderr.
        eprintln!("DST_SEED={}\n{}", run.seed, run.replay);
    }
    let text = if args.json {
        report::render_json(&settings, plan_range(plan), &totals, failure)
    } else {
        report::render_text(&settings, plan_range(plan), &totals, failure)
    };
    print_stdout(&text);
    eprintln!("{}", report::render_timing(&totals, &elapsed));
    if let (Some(path), Some(run)) = (&args.timeline, &kept) {
        write_timeline(&settings, run, path)?;
    }
    Ok(failure.is_none())
}

/// The seeds a plan covers, as the report shows them.
fn plan_range(plan: SeedPlan) -> report::Seeds {
    match plan {
        SeedPlan::Single(seed) => report::Seeds::Single(seed),
        SeedPlan::Sweep { base, count } => report::Seeds::Sweep { base, count },
    }
}

/// Runs seeds `base`, `base + 1`, ... until `count` ran or one failed. Returns the totals
/// and the run worth keeping: the failed one, or the only one of a single-seed run (for its
/// timeline). Seeds run without recording their events; a failed seed is run again, with
/// recording, for its report (the seed replays it exactly), and a single seed records from
/// the start when a timeline is asked for.
fn sweep(
    settings: &RunSettings,
    base: u64,
    count: u64,
    timeline: bool,
) -> (Totals, Option<SeedRun>) {
    let mut totals = Totals::default();
    let mut progress = Progress::new(count);
    let mut kept = None;
    for index in 0..count {
        let seed = base.wrapping_add(index);
        let run = settings.run_seed(seed, timeline && count == 1);
        totals.add(&run);
        if let Err(error) = &run.result {
            // Before any redraw: the simulator's banner is already on stderr.
            progress.abandon();
            let failure = error.to_string();
            let recorded = match run.events.is_empty() {
                true => settings.run_seed(seed, true),
                false => run,
            };
            // Recording only observes, so the seed must fail the same way again.
            assert_eq!(
                recorded.result.as_ref().err().map(ToString::to_string),
                Some(failure),
                "seed {seed} did not replay its failure with recording on"
            );
            return (totals, Some(recorded));
        }
        progress.seed_done(totals.violations);
        if count == 1 {
            kept = Some(run);
        }
    }
    progress.finish();
    (totals, kept)
}

fn print_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (e.g. `| head`) is not worth a panic; the exit code still tells.
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Writes the timeline of a run to `path`.
fn write_timeline(
    settings: &RunSettings,
    run: &SeedRun,
    path: &std::path::Path,
) -> Result<(), CliError> {
    let html = timeline::render(settings, run);
    std::fs::write(path, html).map_err(|source| CliError::Write {
        path: path.display().to_string(),
        source,
    })?;
    eprintln!("kelpie sim: timeline written to {}", path.display());
    Ok(())
}
