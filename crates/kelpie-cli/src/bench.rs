//! `kelpie bench`: lease operations per second against a store, as a table.
//!
//! For each concurrency level, callers (tokio tasks) run four timed cases on actors of their
//! own: acquire fresh actors until the case time is up; renew the leases they took until it
//! is up again; release every lease they took (timed to the last one); and a mixed cycle of
//! acquire, renew, release on one actor each. Every counted operation was acknowledged by the
//! store, which for SQLite means committed and fsynced. The figures are one run each, on a
//! machine whose other load they include: compare them with each other, not across hosts.
//!
//! A benchmark never writes into a store's leases: SQLite is measured in a new file, removed
//! afterwards, and etcd under a key prefix of the run's own (`/kelpie/bench/<pid>-<ms>/`, which
//! nests with no deployment's default `/kelpie/leases/`), whose leases are released at the end
//! by revoking every benchmark node's session, whether the run succeeded or not.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kelpie_core::{ActorId, NodeId, TokioClock};
use kelpie_lease::{LeaseConfig, LeaseManager, MemoryLeaseManager, SqliteLeaseManager};
use serde_json::json;

use crate::error::CliError;
#[cfg(feature = "etcd")]
use crate::lease_cmd::etcd_options;
use crate::lease_cmd::open_sqlite;
use crate::lease_cmd::say;
use crate::stop_signals::StopSignals;
use crate::store_url::StoreUrl;
use crate::timing::Stopwatch;

/// Lease duration in the benchmark: long enough that no lease expires between being taken
/// and being renewed or released, however slow the store.
const BENCH_LEASE_DURATION_MS: u64 = 600_000;
/// Longest case time accepted.
const CASE_MS_MAX: u64 = 60_000;
/// Most concurrent callers.
const CONCURRENCY_MAX: u64 = 1_024;
/// Most fresh actors a run acquires, over all its concurrency levels: the acquire case ends
/// early once its callers took their share, so a store that keeps every lease (the memory
/// store keeps them all, released ones too, about 150 bytes each) stays within a few hundred
/// megabytes however long the case time.
const BENCH_ACTORS_MAX: u64 = 2_000_000;
/// How long to wait for a SQLite lock held by another process.
const SQLITE_TIMEOUT_MS: u64 = 5_000;
/// How long to wait for etcd to connect and for each request.
#[cfg(feature = "etcd")]
const ETCD_TIMEOUT_MS: u64 = 5_000;

/// Options of `kelpie bench`.
#[derive(Debug, Args)]
#[command(after_help = "\
The SQLite store is benchmarked in a new file (by default in the temporary directory), which
is removed afterwards; an existing file is refused rather than filled with benchmark leases.
etcd is benchmarked under a key prefix of the run's own, /kelpie/bench/<pid>-<ms>/ (printed),
never among the leases of /kelpie/leases/; every lease the run took is released at its end.

SIGINT or SIGTERM stops the run after removing the file (or releasing the etcd leases).

The acquire case ends before its time is up once the run took 2,000,000 fresh actors over all
its concurrency levels (an even share for each caller), so that a store keeping every lease
stays within memory; its rate is still operations over the time they took.

Exit codes: 0 done, 1 the store refused an operation the benchmark expected to succeed,
2 bad usage or configuration, 3 store unavailable, 4 the benchmark ran but its answer could
not be written to stdout, 130 stopped by SIGINT or SIGTERM.")]
pub struct BenchArgs {
    /// The store to measure: sqlite:PATH (a new file), memory, or etcd://HOST:PORT
    /// [default: sqlite: in the temporary directory].
    #[arg(long, value_name = "URL")]
    pub store: Option<StoreUrl>,
    /// How long each timed case runs, in ms.
    #[arg(long, value_name = "MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(10..=CASE_MS_MAX))]
    pub case_ms: u64,
    /// Concurrency levels, comma separated.
    #[arg(long, value_name = "N,N", value_delimiter = ',', default_values_t = [1u64, 64],
          value_parser = clap::value_parser!(u64).range(1..=CONCURRENCY_MAX))]
    pub concurrency: Vec<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured case.
#[derive(Debug, Clone)]
struct Row {
    operation: &'static str,
    concurrency: u64,
    operations: u64,
    elapsed: Duration,
}

impl Row {
    fn ops_per_sec(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `kelpie bench`.
pub fn run(args: BenchArgs) -> Result<(), CliError> {
    let store = match &args.store {
        Some(store) => store.clone(),
        None => StoreUrl::Sqlite(
            std::env::temp_dir().join(format!("kelpie-bench-{}.db", std::process::id())),
        ),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| CliError::Usage(format!("cannot start the async runtime: {error}")))?;
    let config = LeaseConfig::new(BENCH_LEASE_DURATION_MS)?;
    let case = Duration::from_millis(args.case_ms);
    let rows = match &store {
        StoreUrl::Sqlite(path) => {
            let manager = Arc::new(SqliteLeaseManager::new(new_sqlite(path)?, config));
            let rows = runtime.block_on(measure_all(manager, &args.concurrency, case));
            remove_sqlite(path);
            rows?
        }
        StoreUrl::Memory => {
            let clock = Arc::new(TokioClock::new());
            let manager = Arc::new(MemoryLeaseManager::in_memory(clock, config));
            runtime.block_on(measure_all(manager, &args.concurrency, case))?
        }
        #[cfg(not(feature = "etcd"))]
        StoreUrl::Etcd(_) => return Err(crate::store_url::StoreUrlError::EtcdNotBuilt.into()),
        #[cfg(feature = "etcd")]
        StoreUrl::Etcd(url) => {
            let prefix = bench_key_prefix();
            let rows = runtime.block_on(measure_etcd(url, &prefix, config, &args, case))?;
            return print_rows(&store, Some(&prefix), &args, &rows);
        }
    };
    print_rows(&store, None, &args, &rows)
}

/// The key prefix of this run's etcd leases: under `/kelpie/bench/`, which no deployment's
/// prefix nests with by default, and unique per run (the process id and the wall clock), so
/// that two runs, or a run and a node, never touch each other's keys.
#[cfg(feature = "etcd")]
#[allow(clippy::disallowed_methods)] // names a run's keys; no lease decision reads it
fn bench_key_prefix() -> String {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let ms = since_epoch.map_or(0, |d| d.as_millis());
    format!("/kelpie/bench/{}-{ms}/", std::process::id())
}

/// Measures etcd under `prefix`, then releases every lease the run took by revoking the
/// sessions of all its nodes (one request each), also when a case failed. A release that
/// fails is reported on stderr: those leases then expire with their sessions.
#[cfg(feature = "etcd")]
async fn measure_etcd(
    url: &crate::store_url::EtcdUrl,
    prefix: &str,
    config: LeaseConfig,
    args: &BenchArgs,
    case: Duration,
) -> Result<Vec<Row>, CliError> {
    let clock = Arc::new(TokioClock::new());
    let options = etcd_options(url, ETCD_TIMEOUT_MS, config, clock).with_key_prefix(prefix);
    let manager = Arc::new(kelpie_lease::EtcdLeaseManager::connect(options).await?);
    let measured = measure_all(Arc::clone(&manager), &args.concurrency, case).await;
    let callers = args.concurrency.iter().copied().max().unwrap_or(0);
    for index in 0..callers {
        let node = Caller::node(index)?;
        if let Err(error) = manager.revoke_node(&node).await {
            eprintln!(
                "kelpie bench: could not release the leases of {node} under {prefix}: {error}; \
                 they expire {} s after the run",
                BENCH_LEASE_DURATION_MS / 1_000
            );
        }
    }
    measured
}

/// A store in a new file: a benchmark must not fill someone's lease store.
fn new_sqlite(path: &Path) -> Result<kelpie_lease::backend::SqliteLeaseStore, CliError> {
    if path.exists() {
        return Err(CliError::Usage(format!(
            "{} exists; kelpie bench writes thousands of leases, so give it a path that does \
             not exist yet (it is removed afterwards)",
            path.display()
        )));
    }
    open_sqlite(path, SQLITE_TIMEOUT_MS)
}

fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        // Best effort: a leftover file in a temporary directory is harmless.
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

/// Every level's rows, or [`CliError::Interrupted`] as soon as SIGINT or SIGTERM arrives, so
/// that the caller still removes the benchmark's file or releases its leases (the signal's
/// default action would end the process with them left behind).
async fn measure_all<M: LeaseManager + 'static>(
    manager: Arc<M>,
    levels: &[u64],
    case: Duration,
) -> Result<Vec<Row>, CliError> {
    let mut stop = StopSignals::install()?;
    let measuring = async {
        let mut rows = Vec::new();
        let actors_per_level = BENCH_ACTORS_MAX / levels.len().max(1) as u64;
        for &concurrency in levels {
            let acquires_max = (actors_per_level / concurrency).max(1);
            rows.extend(measure_level(&manager, concurrency, acquires_max, case).await?);
        }
        Ok(rows)
    };
    tokio::select! {
        rows = measuring => rows,
        signal = stop.first() => Err(CliError::Interrupted {
            signal,
            cleaned_up: "the benchmark's file was removed, or its etcd leases released",
        }),
    }
}

/// The four cases at one concurrency level.
async fn measure_level<M: LeaseManager + 'static>(
    manager: &Arc<M>,
    concurrency: u64,
    acquires_max: u64,
    case: Duration,
) -> Result<Vec<Row>, CliError> {
    let callers: Vec<Caller> = (0..concurrency)
        .map(|index| Caller::new(concurrency, index, acquires_max))
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    let (held, row) = timed(manager, &callers, Phase::Acquire, case).await?;
    rows.push(row.named("acquire", concurrency));
    let callers: Vec<Caller> = callers
        .into_iter()
        .zip(held)
        .map(|(caller, held)| caller.holding(held))
        .collect();
    let (_, row) = timed(manager, &callers, Phase::Renew, case).await?;
    rows.push(row.named("renew", concurrency));
    let (_, row) = timed(manager, &callers, Phase::Release, case).await?;
    rows.push(row.named("release", concurrency));
    let (_, row) = timed(manager, &callers, Phase::Mixed, case).await?;
    rows.push(row.named("acquire+renew+release", concurrency));
    Ok(rows)
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Acquire,
    Renew,
    Release,
    Mixed,
}

/// One caller: its node, its name prefix for actors, how many fresh actors it may acquire,
/// and the actors it holds.
#[derive(Debug, Clone)]
struct Caller {
    node: NodeId,
    prefix: String,
    acquires_max: u64,
    held: Vec<ActorId>,
}

impl Caller {
    /// The node of caller `index` (of every concurrency level).
    fn node(index: u64) -> Result<NodeId, CliError> {
        Ok(NodeId::new(format!("bench-node-{index}"))?)
    }

    fn new(concurrency: u64, index: u64, acquires_max: u64) -> Result<Self, CliError> {
        Ok(Self {
            node: Self::node(index)?,
            prefix: format!("bench-c{concurrency}-w{index}"),
            acquires_max,
            held: Vec::new(),
        })
    }

    fn holding(self, held: Vec<ActorId>) -> Self {
        Self { held, ..self }
    }
}

/// How many operations a phase did and how long it took.
struct Counted {
    operations: u64,
    elapsed: Duration,
}

impl Counted {
    fn named(self, operation: &'static str, concurrency: u64) -> Row {
        Row {
            operation,
            concurrency,
            operations: self.operations,
            elapsed: self.elapsed,
        }
    }
}

/// Runs `phase` on every caller at once; returns the actors each took and the count.
async fn timed<M: LeaseManager + 'static>(
    manager: &Arc<M>,
    callers: &[Caller],
    phase: Phase,
    case: Duration,
) -> Result<(Vec<Vec<ActorId>>, Counted), CliError> {
    let stopwatch = Stopwatch::start();
    let tasks: Vec<_> = callers
        .iter()
        .map(|caller| {
            let (manager, caller) = (Arc::clone(manager), caller.clone());
            tokio::spawn(async move { run_phase(&*manager, caller, phase, stopwatch, case).await })
        })
        .collect();
    let mut held = Vec::new();
    let mut operations = 0;
    for task in tasks {
        let (taken, done) = task
            .await
            .map_err(|error| CliError::Usage(format!("a benchmark task failed: {error}")))??;
        held.push(taken);
        operations += done;
    }
    let elapsed = stopwatch.wall();
    Ok((
        held,
        Counted {
            operations,
            elapsed,
        },
    ))
}

/// One caller's share of a phase: the actors it took and the operations it did.
async fn run_phase<M: LeaseManager>(
    manager: &M,
    caller: Caller,
    phase: Phase,
    stopwatch: Stopwatch,
    case: Duration,
) -> Result<(Vec<ActorId>, u64), CliError> {
    let node = &caller.node;
    let mut taken = Vec::new();
    let mut operations = 0u64;
    let running = || stopwatch.wall() < case;
    match phase {
        Phase::Acquire => {
            while running() && operations < caller.acquires_max {
                let actor = ActorId::new(format!("{}-{operations}", caller.prefix))?;
                manager.acquire(&actor, node).await?;
                taken.push(actor);
                operations += 1;
            }
        }
        Phase::Renew => {
            for actor in caller.held.iter().cycle().take_while(|_| running()) {
                manager.renew(actor, node).await?;
                operations += 1;
            }
        }
        Phase::Release => {
            for actor in &caller.held {
                manager.release(actor, node).await?;
                operations += 1;
            }
        }
        Phase::Mixed => {
            let actor = ActorId::new(format!("{}-mixed", caller.prefix))?;
            while running() {
                match operations % 3 {
                    0 => manager.acquire(&actor, node).await?,
                    1 => manager.renew(&actor, node).await?,
                    _ => manager.release(&actor, node).await?,
                };
                operations += 1;
            }
        }
    }
    Ok((taken, operations))
}

/// Prints the table (or JSON), naming the etcd key prefix the run used, if any.
fn print_rows(
    store: &StoreUrl,
    key_prefix: Option<&str>,
    args: &BenchArgs,
    rows: &[Row],
) -> Result<(), CliError> {
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|row| {
                json!({
                    "operation": row.operation,
                    "concurrency": row.concurrency,
                    "operations": row.operations,
                    "elapsed_ms": row.elapsed.as_millis() as u64,
                    "ops_per_sec": row.ops_per_sec().round(),
                })
            })
            .collect();
        let mut value = json!({"store": store.to_string(), "case_ms": args.case_ms, "rows": rows});
        if let (Some(prefix), Some(fields)) = (key_prefix, value.as_object_mut()) {
            fields.insert("key_prefix".to_string(), json!(prefix));
        }
        return say(&serde_json::to_string_pretty(&value).expect("JSON serializes"));
    }
    let durability = match store {
        StoreUrl::Sqlite(_) => " (WAL, synchronous=FULL, group commit: each op is on disk)",
        StoreUrl::Memory => " (in this process, nothing durable)",
        StoreUrl::Etcd(_) => " (each op is committed by the etcd cluster)",
    };
    let durability = match key_prefix {
        Some(prefix) => format!("{durability}, under key prefix {prefix} (released at the end)"),
        None => durability.to_string(),
    };
    say(&format!(
        "kelpie bench: {store}{durability}, {} ms per timed case",
        args.case_ms
    ))?;
    say(&format!(
        "{:<24} {:>11} {:>10} {:>9} {:>12}",
        "operation", "concurrency", "ops", "ms", "ops/s"
    ))?;
    for row in rows {
        say(&format!(
            "{:<24} {:>11} {:>10} {:>9} {:>12.0}",
            row.operation,
            row.concurrency,
            row.operations,
            row.elapsed.as_millis(),
            row.ops_per_sec()
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kelpie_lease::backend::LeaseStore;

    /// The acquire case stops once its callers took their share of fresh actors, however
    /// long its time: the memory store would otherwise keep leases until memory ran out.
    #[tokio::test]
    async fn the_acquire_case_stops_at_its_share_of_actors() {
        let config = LeaseConfig::new(BENCH_LEASE_DURATION_MS).unwrap();
        let manager = Arc::new(MemoryLeaseManager::in_memory(
            Arc::new(TokioClock::new()),
            config,
        ));
        let rows = measure_level(&manager, 2, 5, Duration::from_millis(200))
            .await
            .unwrap();
        let counts: Vec<_> = rows
            .iter()
            .map(|row| (row.operation, row.operations))
            .collect();
        assert_eq!(counts[0], ("acquire", 10));
        assert_eq!(counts[2], ("release", 10), "every lease taken is released");
        let records = manager.store().scan().await.unwrap().records;
        let fresh = records
            .iter()
            .filter(|(actor_id, _)| !actor_id.as_str().ends_with("-mixed"))
            .count();
        assert_eq!(fresh, 10, "the store keeps the fresh actors taken, no more");
    }
}
