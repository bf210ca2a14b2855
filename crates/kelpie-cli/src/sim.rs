//! `kelpie sim`: the lease scenario in the deterministic simulator over many seeds.
//!
//! Every seed is a complete, reproducible run: nodes acquire, renew and release leases on a
//! few contended actors through the production protocol while faults fire and the TLA+
//! invariants are checked after every step. Seeds run on `--jobs` threads through
//! [`kelpie_sim::Sweep`], which hands their outcomes back in seed order, so the report is the
//! same for any number of jobs. The sweep stops at the first failing seed in seed order,
//! prints how to replay it, and exits 1; the replay is that one seed, so there is nothing to
//! gain from running further seeds first (unless `--keep-going` asks for every failing seed).
//! `--shard I/N` runs one part of a sweep split across processes, `--time-budget` runs seeds
//! until the time is spent, and `kelpie sim merge` (`merge.rs`) adds up shards' reports.

use std::collections::BTreeMap;
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Args, Subcommand};
use kelpie_core::limits::{LEASE_DURATION_MS_MAX, LEASE_DURATION_MS_MIN};
use kelpie_dst::mutations::Mutation;
use kelpie_dst::{LeaseEvent, LeaseRunReport, LeaseScenario, SwarmStore};
use kelpie_lease::machine::BeliefConfig;
use kelpie_sim::{FaultConfig, Shard, SimConfig, SimError, Sweep, SweepEnd, SWEEP_JOBS_MAX};
use kelpie_sim::{Simulation, SIM_STEPS_MAX_DEFAULT, SIM_TIME_MS_MAX_DEFAULT};
use rand::RngCore;

use crate::error::CliError;
use crate::faults::{describe, FaultPlan};
use crate::merge::MergeArgs;
use crate::progress::Progress;
use crate::report::{self, FailedSeed, Report, SweepShape, Totals};
use crate::timeline;
use crate::timing::{thread_cpu_time, Stopwatch};

/// Seeds run when neither `--seed`, `--seeds` nor `DST_SEED` is given.
pub const SEEDS_DEFAULT: u64 = 100;
/// Most seeds one invocation runs.
pub const SEEDS_MAX: u64 = 1_000_000;
/// Most simulated nodes.
pub const NODES_MAX: u64 = 64;
/// Most contended actors.
pub const ACTORS_MAX: u64 = 100_000;
/// Longest simulated run per seed, in seconds (one hour).
pub const SIM_SECS_MAX: u64 = 3_600;
/// Executor steps allowed per node per simulated second, far above what the scenario takes
/// (a node makes a few requests per second, each a handful of steps); the bound only stops a
/// run that livelocks.
const STEPS_PER_NODE_SECOND_MAX: u64 = 20_000;
/// Executor steps allowed per actor per simulated second on top of the nodes' share, far above
/// what the scenario takes (a held lease is renewed about three times per lease duration, each
/// renewal a handful of steps): with thousands of actors the renewals, not the nodes, make
/// most of the steps.
const STEPS_PER_ACTOR_SECOND_MAX: u64 = 2_000;

const SIM_AFTER_HELP: &str = "\
Seeds: --seed S runs one seed (a replay); --seeds N runs --base-seed B, B+1, ... B+N-1, with a
random base printed on stderr when --base-seed is not given. With none of --seed, --seeds and
--base-seed, DST_SEED (if set) is the one seed, otherwise 100 seeds run.

Faults: swarm (the default) draws a mix per seed; none; or a list like
storage-write-fail=0.1,partition=0.05 (a name's unique last hyphenated part, such as
write-fail, is enough).

Parallel and split sweeps: --jobs N runs seeds on N threads (default: the available cores);
the report is the same for any N. --shard I/N runs only the seeds whose index in the sweep is
I modulo N (with --base-seed, so every shard runs the same sweep): run shards 0/N .. N-1/N
with --json on N machines, then `kelpie sim merge FILE...` prints the whole sweep's report.
--time-budget 10m runs consecutive seeds until 10 minutes have passed (no seed starts after
that, except the first, which always runs; seeds running finish) and reports how many ran;
with --seeds N it stops at N at most, without, at 1000000.

Output: the report goes to stdout and depends only on the options and seeds (never on
--jobs, nor on DST_CHECK_DETERMINISM, which only the tests read), so two runs of the same
seeds print identical stdout. Progress and timing (wall and
CPU time, simulated events per CPU second, time compression, CPU time per seed of the first
and last tenth of the seeds) go to stderr.

On the first failing seed (in seed order) the run stops and exits 1. stdout then starts with
DST_SEED=<n>, followed by the exact command that replays it, the invariant, the step, the
message and the last events before it (with --json, the same as fields of the JSON object,
and DST_SEED=<n> with the replay command go first to stderr). With --keep-going every seed
runs and every failing seed is listed (seed, invariant, replay command) after the first one's
details; the exit code is still 1.

Exit codes: 0 no violation, 1 a seed failed, 2 bad usage (or reports that cannot be merged).";

/// Options of `kelpie sim`.
#[derive(Debug, Args)]
#[command(after_help = SIM_AFTER_HELP, args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    /// `merge`, or nothing to run seeds.
    #[command(subcommand)]
    pub command: Option<SimCommand>,
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
    /// The store the nodes use: protocol (the lease protocol's own store, as memory and
    /// SQLite run it), etcd (the etcd backend over a simulated etcd), or mixed (each seed
    /// draws one).
    #[arg(long, value_enum, default_value_t = StoreChoice::Protocol)]
    pub store: StoreChoice,
    /// Faults to inject: swarm, none, or NAME=PROBABILITY,...
    #[arg(long, default_value = "swarm", value_name = "LIST")]
    pub faults: FaultPlan,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write an HTML page with an SVG timeline of the run (needs one seed: --seed or DST_SEED).
    #[arg(
        long,
        value_name = "FILE.html",
        conflicts_with_all = ["seeds", "base_seed"]
    )]
    pub timeline: Option<PathBuf>,
    /// Break one part on purpose, to show the checkers catch it: the run should fail.
    ///
    /// The part is the protocol, a keeper, the store, the etcd backend or the simulated etcd;
    /// the etcd-* bugs need --store etcd, the others --store protocol. etcd-belief-from-reply
    /// and etcd-ignore-expired-keepalive run with at least 5 nodes, 20 actors and 60 s per
    /// seed, where they are met often enough to fail 100 seeds.
    #[arg(
        long,
        value_name = "NAME",
        value_parser = clap::builder::PossibleValuesParser::new(Mutation::ALL.map(Mutation::name))
            .map(|name| Mutation::from_name(&name).expect("offered names are mutations"))
    )]
    pub inject_bug: Option<Mutation>,
    /// Threads to run seeds on [default: the available cores].
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..=SWEEP_JOBS_MAX as u64)
    )]
    pub jobs: Option<u64>,
    /// Run only the seeds whose index in the sweep is I modulo N (needs --base-seed).
    #[arg(
        long,
        value_name = "I/N",
        requires = "base_seed",
        conflicts_with_all = ["seed", "time_budget", "timeline"]
    )]
    pub shard: Option<Shard>,
    /// Start no seed after this much time (e.g. 90s, 10m, 2h), then report how many ran.
    #[arg(long, value_name = "DURATION", value_parser = parse_time_budget, conflicts_with = "seed")]
    pub time_budget: Option<TimeBudget>,
    /// Run every seed and list every failing one, instead of stopping at the first.
    #[arg(long)]
    pub keep_going: bool,
}

/// `--store`: which simulated store the seeds run on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum StoreChoice {
    /// The lease protocol's own store (`decide`), as the memory and SQLite stores run it.
    Protocol,
    /// The etcd backend over the simulated etcd.
    Etcd,
    /// Each seed runs on one of the two, drawn from the seed.
    Mixed,
}

impl StoreChoice {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            StoreChoice::Protocol => "protocol",
            StoreChoice::Etcd => "etcd",
            StoreChoice::Mixed => "mixed",
        }
    }

    /// The store `seed` runs on.
    pub fn for_seed(self, seed: u64) -> SwarmStore {
        match self {
            StoreChoice::Protocol => SwarmStore::Protocol,
            StoreChoice::Etcd => SwarmStore::Etcd,
            // A mix of the seed's bits, so neighbouring seeds do not simply alternate.
            StoreChoice::Mixed if seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 63 == 1 => {
                SwarmStore::Etcd
            }
            StoreChoice::Mixed => SwarmStore::Protocol,
        }
    }
}

/// Subcommands of `kelpie sim`.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Merge the --json reports of a sweep's shards into the whole sweep's report.
    Merge(MergeArgs),
}

/// A `--time-budget`: the text given and what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeBudget {
    /// As given, for the report.
    pub text: String,
    /// How long.
    pub duration: Duration,
}

/// Why a `--time-budget` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeBudgetError {
    /// Not a duration.
    #[error("{value:?} is not a duration such as 90s, 10m or 2h: {reason}")]
    Syntax {
        /// The refused text.
        value: String,
        /// What humantime said.
        reason: String,
    },
    /// Zero.
    #[error("a time budget of {value} runs no seed; give a positive duration")]
    Zero {
        /// The refused text.
        value: String,
    },
}

/// Parses a `--time-budget` (humantime: `90s`, `10m`, `1h 30m`).
fn parse_time_budget(value: &str) -> Result<TimeBudget, TimeBudgetError> {
    let duration = humantime::parse_duration(value).map_err(|e| TimeBudgetError::Syntax {
        value: value.to_string(),
        reason: e.to_string(),
    })?;
    if duration.is_zero() {
        return Err(TimeBudgetError::Zero {
            value: value.to_string(),
        });
    }
    Ok(TimeBudget {
        text: value.trim().to_string(),
        duration,
    })
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
    /// The store the seeds run on.
    pub store: StoreChoice,
}

/// One finished seed.
#[derive(Debug)]
pub struct SeedRun {
    /// The seed.
    pub seed: u64,
    /// The store it ran on.
    pub store: SwarmStore,
    /// The faults it ran with.
    pub faults: Vec<FaultConfig>,
    /// The command that replays it.
    pub replay: String,
    /// Its report, or why it failed.
    pub result: Result<LeaseRunReport, SimError>,
    /// Its events (the most recent ones, if there were very many).
    pub events: Vec<LeaseEvent>,
    /// The coverage marks it hit.
    pub marks: BTreeMap<&'static str, u64>,
}

impl RunSettings {
    fn from_args(args: &SimArgs) -> Result<Self, CliError> {
        let lease_ms = match args.inject_bug {
            Some(mutation) => mutation.lease_duration_ms(args.lease_ms),
            None => args.lease_ms,
        };
        if lease_ms != args.lease_ms {
            eprintln!(
                "kelpie sim: --inject-bug {} runs with --lease-ms {lease_ms} (where the etcd \
                 session's TTL is the lease)",
                args.inject_bug.map_or("", Mutation::name)
            );
        }
        let size_min = args.inject_bug.map(Mutation::sim_size_min);
        let nodes = size_min.map_or(args.nodes, |min| args.nodes.max(min.nodes));
        let actors = size_min.map_or(args.actors, |min| args.actors.max(min.actors));
        let sim_secs = size_min.map_or(args.sim_secs, |min| args.sim_secs.max(min.sim_secs));
        if (nodes, actors, sim_secs) != (args.nodes, args.actors, args.sim_secs) {
            eprintln!(
                "kelpie sim: --inject-bug {} runs with --nodes {nodes} --actors {actors} \
                 --sim-secs {sim_secs} at least (smaller runs rarely meet it)",
                args.inject_bug.map_or("", Mutation::name)
            );
        }
        let settings = Self {
            nodes,
            actors,
            lease_ms,
            sim_secs,
            faults: args.faults.clone(),
            inject_bug: args.inject_bug,
            store: args.store,
        };
        if let Some(mutation) = args.inject_bug {
            let on_etcd = mutation.on_etcd();
            if on_etcd && args.store != StoreChoice::Etcd {
                return Err(CliError::Usage(format!(
                    "--inject-bug {} breaks the etcd backend or etcd; run it with --store etcd",
                    mutation.name()
                )));
            }
            if !on_etcd && args.store != StoreChoice::Protocol {
                return Err(CliError::Usage(format!(
                    "--inject-bug {} breaks the lease protocol's store; run it with --store \
                     protocol",
                    mutation.name()
                )));
            }
        }
        // Checked here so that a bad combination is a usage error, not a failed seed.
        let cluster = settings.scenario(SwarmStore::Protocol).cluster;
        BeliefConfig::new(
            cluster.lease_duration_ms,
            cluster.clock_drift_ppm_max,
            cluster.safety_margin_ms,
        )?;
        for store in [SwarmStore::Protocol, SwarmStore::Etcd] {
            settings.planned_duration_ms_max(store, 0)?;
        }
        Ok(settings)
    }

    /// The scenario a seed runs, on `store`.
    pub fn scenario(&self, store: SwarmStore) -> LeaseScenario {
        let mut scenario = LeaseScenario::default();
        scenario.nodes_count = usize::try_from(self.nodes).expect("bounded by NODES_MAX");
        scenario.actors_count = usize::try_from(self.actors).expect("bounded by ACTORS_MAX");
        scenario.sim_duration_ms = self.sim_secs * 1_000;
        scenario.cluster = scenario.cluster_with_lease_duration_ms(self.lease_ms);
        scenario.cluster.store = store;
        if let Some(mutation) = self.inject_bug {
            mutation.apply(&mut scenario);
        }
        scenario
    }

    /// The latest simulated instant a seed's run on `store` can reach
    /// ([`LeaseScenario::planned_duration_ms_max`], at the simulator's default latencies).
    fn planned_duration_ms_max(&self, store: SwarmStore, seed: u64) -> Result<u64, CliError> {
        self.scenario(store)
            .planned_duration_ms_max(&SimConfig::new(seed))
            .map_err(CliError::Usage)
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
        let store = self.store.for_seed(seed);
        if store != SwarmStore::Protocol {
            command.push_str(&format!(" --store {}", store.name()));
        }
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
        let steps_per_second_max =
            STEPS_PER_NODE_SECOND_MAX * self.nodes + STEPS_PER_ACTOR_SECOND_MAX * self.actors;
        // The bounds on steps and simulated time only stop a run gone wrong: they follow the
        // run's planned length, which the liveness phase stretches by a few lease durations
        // (a day's leases need days of simulated time).
        let planned_ms = self
            .planned_duration_ms_max(self.store.for_seed(seed), seed)
            .expect("checked when the settings were made");
        let steps_max = steps_per_second_max
            .saturating_mul(planned_ms.div_ceil(1_000))
            .max(SIM_STEPS_MAX_DEFAULT);
        let sim_time_ms_max = planned_ms.saturating_mul(2).max(SIM_TIME_MS_MAX_DEFAULT);
        let config = SimConfig::new(seed)
            .with_steps_max(steps_max)
            .with_sim_time_ms_max(sim_time_ms_max)
            .with_reproduce_command(replay.clone())
            // The command prints DST_SEED and the replay command first itself, on stdout.
            .with_failure_banner(false)
            // DST_CHECK_DETERMINISM is the test harness's: read here it would run each seed
            // twice and count its coverage marks twice, and the report must depend only on
            // the options and seeds. A sweep's determinism is checked by running it again.
            .with_check_determinism(false);
        let simulation = faults
            .iter()
            .fold(Simulation::new(config), |sim, fault| sim.with_fault(*fault));
        // Marks are counted per thread, and a thread runs one seed at a time: the marks taken
        // after the run are this seed's.
        let _ = kelpie_core::coverage::take_hits();
        let store = self.store.for_seed(seed);
        let (result, events) = if record {
            self.scenario(store).run_recorded(simulation)
        } else {
            (self.scenario(store).run(simulation), Vec::new())
        };
        SeedRun {
            seed,
            store,
            faults,
            replay,
            result,
            events,
            marks: kelpie_core::coverage::take_hits(),
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
    // A time budget without --seeds runs until the budget is spent, within the bound.
    let count_default = match args.time_budget {
        Some(_) => SEEDS_MAX,
        None => SEEDS_DEFAULT,
    };
    Ok(SeedPlan::Sweep {
        base,
        count: args.seeds.unwrap_or(count_default),
    })
}

/// How the seeds of one invocation are run.
#[derive(Debug, Clone)]
struct SweepOptions {
    jobs: NonZeroUsize,
    shard: Shard,
    keep_going: bool,
    time_budget: Option<TimeBudget>,
    /// Record the events of a single seed from the start (for its timeline).
    record_single: bool,
}

impl SweepOptions {
    fn from_args(args: &SimArgs) -> Self {
        let jobs = match args.jobs {
            Some(jobs) => usize::try_from(jobs).expect("bounded by SWEEP_JOBS_MAX"),
            None => std::thread::available_parallelism()
                .map_or(1, NonZeroUsize::get)
                .min(SWEEP_JOBS_MAX),
        };
        Self {
            jobs: NonZeroUsize::new(jobs).expect("at least one job"),
            shard: args.shard.unwrap_or(Shard::WHOLE),
            keep_going: args.keep_going,
            time_budget: args.time_budget.clone(),
            record_single: args.timeline.is_some(),
        }
    }
}

/// Runs `kelpie sim`; `Ok(false)` when a seed failed.
pub fn run(args: SimArgs) -> Result<bool, CliError> {
    if let Some(SimCommand::Merge(merge)) = args.command {
        return crate::merge::run(merge);
    }
    let settings = RunSettings::from_args(&args)?;
    let options = SweepOptions::from_args(&args);
    let plan = seed_plan(&args)?;
    if let (Some(_), SeedPlan::Sweep { .. }) = (&args.timeline, &plan) {
        return Err(CliError::Usage(
            "--timeline draws one seed: give it --seed <N>, or set DST_SEED".into(),
        ));
    }
    let stopwatch = Stopwatch::start();
    let (base, count) = match plan {
        SeedPlan::Single(seed) => (seed, 1),
        SeedPlan::Sweep { base, count } => {
            let what = match options.shard.is_whole() {
                true => format!("{count} seeds"),
                false => format!("shard {} of {count} seeds", options.shard),
            };
            let jobs = options.jobs.get();
            let plural = if jobs == 1 { "" } else { "s" };
            eprintln!(
                "kelpie sim: {what} from base seed {base} on {jobs} job{plural} (repeat with \
                 --base-seed {base})"
            );
            (base, count)
        }
    };
    let outcome = sweep(&settings, base, count, &options);
    let elapsed = stopwatch.elapsed();
    let failure = outcome.first_failure.as_ref();
    if let (true, Some(run)) = (args.json, failure) {
        // stdout is one JSON object; the replay instructions still come first, on stderr.
        eprintln!("DST_SEED={}\n{}", run.seed, run.replay);
    }
    let shape = SweepShape {
        shard: options.shard,
        keep_going: options.keep_going,
        time_budget: options.time_budget.as_ref().map(|b| b.text.clone()),
        budget_spent: matches!(outcome.end, SweepEnd::BudgetSpent { .. }),
    };
    let report = Report::new(
        &settings,
        plan_range(plan),
        &shape,
        &outcome.totals,
        failure,
        outcome.failures,
    );
    let text = match args.json {
        true => report.to_json(),
        false => report.to_text(),
    };
    print_stdout(&text);
    eprintln!("{}", report::render_timing(&outcome.totals, &elapsed));
    if let (Some(path), Some(run)) = (&args.timeline, outcome.kept.as_ref().or(failure)) {
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

/// What a sweep ran.
struct SweepOutcome {
    totals: Totals,
    /// The first failing seed in seed order, re-run with its events recorded.
    first_failure: Option<SeedRun>,
    /// Every failing seed, in seed order.
    failures: Vec<FailedSeed>,
    /// The only run of a single-seed invocation that passed (for its timeline).
    kept: Option<SeedRun>,
    end: SweepEnd,
}

/// A seed's run and the CPU time it took on its thread (for the figures on stderr).
struct TimedRun {
    run: SeedRun,
    cpu: Duration,
}

/// Runs seeds `base`, `base + 1`, ... (those of the shard) on the option's jobs until `count`
/// ran, one failed (unless keeping going) or the time budget is spent. Seeds run without
/// recording their events; the first failed seed is run again, with recording, for its
/// report (the seed replays it exactly), and a single seed records from the start when a
/// timeline is asked for.
fn sweep(settings: &RunSettings, base: u64, count: u64, options: &SweepOptions) -> SweepOutcome {
    let sweep = Sweep::new(base, count)
        .with_jobs(options.jobs)
        .with_shard(options.shard);
    let budget = options.time_budget.as_ref().map(|b| b.duration);
    let mut progress = Progress::new(sweep.seeds_count(), budget);
    let stopwatch = Stopwatch::start();
    let record = options.record_single && count == 1;
    let job = |seed| {
        let cpu_start = thread_cpu_time();
        let run = settings.run_seed(seed, record);
        let cpu = thread_cpu_time().saturating_sub(cpu_start);
        TimedRun { run, cpu }
    };
    let stops = |timed: &TimedRun| !options.keep_going && timed.run.result.is_err();
    // The first seed always starts: a budget spent before any seed ran would report a pass
    // that checked nothing.
    let first_started = std::sync::atomic::AtomicBool::new(false);
    let more = || {
        let first = !first_started.swap(true, std::sync::atomic::Ordering::Relaxed);
        first || budget.is_none_or(|budget| stopwatch.wall() < budget)
    };
    let (mut totals, mut failures) = (Totals::default(), Vec::new());
    let (mut first_failure, mut kept) = (None, None);
    let end = sweep.run(job, stops, more, |_, TimedRun { run, cpu }| {
        totals.add(&run);
        progress.seed_done(totals.violations, cpu);
        if run.result.is_err() {
            failures.push(FailedSeed::of(&run));
            first_failure.get_or_insert(run);
        } else if count == 1 {
            kept = Some(run);
        }
    });
    match first_failure.is_some() {
        true => progress.abandon(),
        false => progress.finish(),
    }
    SweepOutcome {
        totals,
        first_failure: first_failure.map(|run| recorded(settings, run)),
        failures,
        kept,
        end,
    }
}

/// A failed run with its events: itself if it recorded them, or the seed run again with
/// recording on.
fn recorded(settings: &RunSettings, run: SeedRun) -> SeedRun {
    if !run.events.is_empty() {
        return run;
    }
    let failure = run.result.as_ref().err().map(ToString::to_string);
    let recorded = settings.run_seed(run.seed, true);
    // Recording only observes, so the seed must fail the same way again.
    assert_eq!(
        recorded.result.as_ref().err().map(ToString::to_string),
        failure,
        "seed {} did not replay its failure with recording on",
        run.seed
    );
    recorded
}

/// Writes `text` to stdout.
pub fn print_stdout(text: &str) {
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
