//! Durable lease operations per second on the SQLite store:
//! `cargo bench -p kelpie-lease --bench sqlite`.
//!
//! Runs the same work (each caller cycles acquire, renew, release on its own actor) at
//! concurrency 1 and 64, with group commit and with one transaction (one fsync) per operation,
//! and prints a table, the ratio at concurrency 64, and whether it meets the
//! [`GROUP_COMMIT_SPEEDUP_TARGET`]. Every operation is acknowledged only after its commit,
//! so each one counted is on disk. Callers are tasks on a tokio runtime with one worker per
//! core but one (the writer thread needs the other); the store runs on the wall clock, as it
//! would in a process. Each run uses a new file in a temporary directory; each figure is the
//! best of [`ROUNDS_COUNT`] runs.

use std::sync::Arc;

use kelpie_core::{ActorId, Clock, NodeId, TokioClock};
use kelpie_lease::{backend::SqliteLeaseStore, backend::SqliteStats, SqliteOptions};
use kelpie_lease::{LeaseConfig, LeaseManager, SqliteLeaseManager};

/// Concurrency levels measured.
const CONCURRENCY_LEVELS: [usize; 2] = [1, 64];
/// Operations per run where every operation pays its own fsync: enough for a stable rate,
/// few enough to keep the whole benchmark well under a minute.
const OPERATIONS_UNBATCHED: usize = 2_000;
/// Operations per run where concurrent operations share fsyncs: more, because each costs
/// far less, and a short run would mostly measure its own start.
const OPERATIONS_GROUP_COMMIT: usize = 100_000;
/// Repetitions of each run; the best is reported, which filters out the other processes
/// sharing this machine's cores and disk rather than flattering either mode.
const ROUNDS_COUNT: usize = 3;
/// Operations before timing starts, to create the file and warm the caches.
const OPERATIONS_WARM_UP: usize = 64;
/// How much faster group commit must be than one fsync per operation at concurrency 64.
const GROUP_COMMIT_SPEEDUP_TARGET: f64 = 20.0;

/// One measured run.
struct Run {
    group_commit: bool,
    concurrency: usize,
    operations: usize,
    elapsed_ms: u64,
    stats: SqliteStats,
}

impl Run {
    fn ops_per_sec(&self) -> f64 {
        self.operations as f64 * 1_000.0 / self.elapsed_ms.max(1) as f64
    }
}

/// Each caller's share of the work: acquire, renew, release on its own actor, repeated.
async fn caller(manager: Arc<SqliteLeaseManager>, index: usize, operations: usize) {
    let actor = ActorId::new(format!("actor-{index}")).unwrap();
    let node = NodeId::new(format!("node-{index}")).unwrap();
    for op in 0..operations {
        let result = match op % 3 {
            0 => manager.acquire(&actor, &node).await,
            1 => manager.renew(&actor, &node).await,
            _ => manager.release(&actor, &node).await,
        };
        result.unwrap();
    }
}

async fn run_callers(manager: &Arc<SqliteLeaseManager>, concurrency: usize, operations: usize) {
    let per_caller = operations / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|index| tokio::spawn(caller(Arc::clone(manager), index, per_caller)))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    clock: &TokioClock,
    group_commit: bool,
    concurrency: usize,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions::default().with_group_commit(group_commit);
    let store = SqliteLeaseStore::open_with(dir.path().join("leases.db"), options).unwrap();
    let manager = Arc::new(SqliteLeaseManager::new(store, LeaseConfig::default()));
    let target = if group_commit && concurrency > 1 {
        OPERATIONS_GROUP_COMMIT
    } else {
        OPERATIONS_UNBATCHED
    };
    // Whole acquire-renew-release cycles per caller, so every run ends with leases released.
    let operations = target / (concurrency * 3) * concurrency * 3;
    runtime.block_on(run_callers(&manager, concurrency, OPERATIONS_WARM_UP * 3));
    let before = manager.store().stats();
    let start_ms = clock.now_ms();
    runtime.block_on(run_callers(&manager, concurrency, operations));
    let elapsed_ms = clock.now_ms() - start_ms;
    let after = manager.store().stats();
    Run {
        group_commit,
        concurrency,
        operations,
        elapsed_ms,
        stats: SqliteStats {
            transactions_committed: after.transactions_committed - before.transactions_committed,
            operations_committed: after.operations_committed - before.operations_committed,
        },
    }
}

fn print_run(run: &Run) {
    let mode = if run.group_commit {
        "group commit"
    } else {
        "one fsync per operation"
    };
    let per_commit =
        run.stats.operations_committed as f64 / run.stats.transactions_committed.max(1) as f64;
    println!(
        "{mode:<24} {:>11} {:>10} {:>10} {:>12.0} {per_commit:>10.1}",
        run.concurrency,
        run.operations,
        run.elapsed_ms,
        run.ops_per_sec()
    );
}

/// Group commit's speed-up over one fsync per operation at `concurrency` among `runs`.
fn speedup(runs: &[&Run], concurrency: usize) -> f64 {
    let rate = |group_commit: bool| {
        runs.iter()
            .find(|r| r.group_commit == group_commit && r.concurrency == concurrency)
            .map(|r| r.ops_per_sec())
            .unwrap()
    };
    rate(true) / rate(false)
}

fn main() {
    // One core is left to the store's writer thread, which every operation passes through:
    // with as many workers as cores, the workers and the writer preempt one another on every
    // reply (on two cores, seven times the context switches and twice the CPU per operation).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cores.saturating_sub(1).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_time()
        .build()
        .unwrap();
    let clock = TokioClock::new();
    let modes: Vec<(usize, bool)> = CONCURRENCY_LEVELS
        .iter()
        .flat_map(|&concurrency| [(concurrency, true), (concurrency, false)])
        .collect();
    // Rounds interleave the modes, so that each round compares them under the same load from
    // whatever else shares the machine.
    let rounds: Vec<Vec<Run>> = (0..ROUNDS_COUNT)
        .map(|_| {
            modes
                .iter()
                .map(|&(concurrency, group_commit)| {
                    measure(&runtime, &clock, group_commit, concurrency)
                })
                .collect()
        })
        .collect();
    println!(
        "SQLite lease store, WAL + synchronous=FULL: durable operations per second \
         (best of {ROUNDS_COUNT} rounds; {workers} tokio worker(s) on {cores} cores)"
    );
    println!(
        "{:<24} {:>11} {:>10} {:>10} {:>12} {:>10}",
        "mode", "concurrency", "ops", "ms", "ops/s", "ops/commit"
    );
    let best: Vec<&Run> = (0..modes.len())
        .map(|mode| {
            rounds
                .iter()
                .map(|round| &round[mode])
                .max_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()))
                .unwrap()
        })
        .collect();
    best.iter().for_each(|run| print_run(run));
    let ratio = speedup(&best, 64);
    let per_round: Vec<String> = rounds
        .iter()
        .map(|round| format!("{:.1}x", speedup(&round.iter().collect::<Vec<_>>(), 64)))
        .collect();
    let verdict = if ratio >= GROUP_COMMIT_SPEEDUP_TARGET {
        "meets"
    } else {
        "MISSES"
    };
    println!(
        "group commit at concurrency 64 is {ratio:.1}x one fsync per operation (rounds: {}): \
         {verdict} the {GROUP_COMMIT_SPEEDUP_TARGET}x target",
        per_round.join(", ")
    );
}
