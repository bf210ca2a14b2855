//! The etcd lease backend against a real etcd:
//! `scripts/with-etcd cargo bench -p kelpie-lease --bench etcd`.
//!
//! Reads the endpoints from `KELPIE_ETCD_ENDPOINTS` and prints a skip line (exiting 0) without
//! it. Every run works under a key prefix of its own and deletes it at the end. It prints:
//!
//! - **Throughput and latency at concurrency 16.** [`CONCURRENCY`] tokio tasks, each on actors
//!   of its own, acquire fresh actors, renew them and release them through
//!   [`EtcdLeaseManager`] (the tasks are one node, as on a node activating many actors at
//!   once), and the same three transactions are issued directly with `etcd_client` on a
//!   pre-granted etcd lease: the acquire transaction is built exactly as the manager builds
//!   it. Each case is [`OPS_PER_TASK`] operations per task; the cases are interleaved (ours,
//!   raw, ours, raw, ...) in each of [`ROUNDS_COUNT`] rounds, and the best round of each case
//!   is reported, with the acquire ratio ours/raw against [`RAW_RATIO_TARGET`]. A third
//!   acquire case sends a keepalive of the raw lease before each raw transaction, the two
//!   round trips in series that the manager's acquire makes, to tell the cost of the protocol
//!   from the cost of the manager's code.
//! - **The renewal cost of a large node.** One node acquires [`NODE_ACTORS_COUNT`] actors;
//!   then [`RENEWAL_ROUNDS_COUNT`] renewal rounds ([`EtcdLeaseManager::keep_alive_node`])
//!   are timed, and the manager's counters say how many keepalives and session grants each
//!   took (the target is one keepalive). [`EtcdLeaseManager::revoke_node`] then releases them
//!   all, also timed.
//! - **Handover after a voluntary release.** In each of [`HANDOVER_ROUNDS_COUNT`] rounds node A
//!   holds an actor through one manager and node B waits for it through another with
//!   [`EtcdLeaseManager::acquire_waiting`]; A releases, and the time from the start of A's
//!   release call to B's grant is recorded. p50 and p99 are reported against
//!   [`HANDOVER_P50_TARGET_US`].
//!
//! Every operation counted was acknowledged by etcd, which means committed by the cluster
//! (fsynced on its members). The figures include whatever else runs on the machine,
//! including etcd itself when it runs on the same cores.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp,
};
use kelpie_core::{ActorId, NodeId};
use kelpie_lease::{
    backend::EtcdStats, limits::ETCD_ENDPOINTS_ENV, EtcdLeaseManager, EtcdOptions, LeaseConfig,
    LeaseManager,
};

/// Concurrent callers in the throughput cases.
const CONCURRENCY: usize = 16;
/// Operations per caller in each throughput case: 16 x 250 = 4,000 per case, under a second
/// on loopback, long enough to average over etcd's fsync batches and short enough that the
/// whole benchmark stays well under a minute.
const OPS_PER_TASK: usize = 250;
/// Operations per caller before anything is timed, to open connections and grant sessions.
const WARM_UP_OPS_PER_TASK: usize = 8;
/// Repetitions of each throughput case; the best is reported, which filters out the other
/// processes sharing the machine rather than flattering either side.
const ROUNDS_COUNT: usize = 5;
/// The fraction of the raw `etcd_client` acquire rate the manager's acquire must reach.
const RAW_RATIO_TARGET: f64 = 0.9;
/// Actors held by one node in the renewal-cost measurement.
const NODE_ACTORS_COUNT: usize = 10_000;
/// Renewal rounds timed for that node.
const RENEWAL_ROUNDS_COUNT: usize = 20;
/// Keepalives one renewal round may take, whatever the number of actors.
const KEEPALIVES_PER_RENEWAL_TARGET: u64 = 1;
/// Handover rounds timed.
const HANDOVER_ROUNDS_COUNT: usize = 200;
/// The handover median to reach on loopback, in microseconds (5 ms).
const HANDOVER_P50_TARGET_US: u64 = 5_000;
/// How long node A keeps the actor after node B starts waiting, so that B has been refused
/// and has its watch open when A releases (B needs a few loopback round trips for that).
const HANDOVER_SETTLE_MS: u64 = 25;
/// How long node B waits for the actor at most; far more than a handover takes.
const HANDOVER_WAIT_MS: u64 = 10_000;
/// Lease duration for every lease in the benchmark: long enough that nothing expires while it
/// runs, however loaded the machine.
const BENCH_LEASE_DURATION_MS: u64 = 120_000;
/// The TTL of the raw side's pre-granted etcd lease, in seconds: the manager's session TTL.
const RAW_LEASE_TTL_S: i64 = (BENCH_LEASE_DURATION_MS / 1_000) as i64;
/// Connect and per-request timeout: generous, since a loaded machine must slow the figures
/// down, not fail the run.
const ETCD_TIMEOUT_MS: u64 = 30_000;
/// The longest the whole benchmark may take before it fails (five minutes; it normally takes
/// well under one).
const RUN_TIMEOUT_MS: u64 = 300_000;
/// Microseconds per millisecond, for printing latencies.
const US_PER_MS: f64 = 1_000.0;

/// Real time. The rest of the workspace runs under the simulator's clock, but a benchmark
/// measures the real world by definition.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// A real sleep, for the same reason as [`now`].
#[allow(clippy::disallowed_methods)]
async fn sleep_ms(duration_ms: u64) {
    tokio::time::sleep(Duration::from_millis(duration_ms)).await;
}

/// Wall-clock milliseconds, only to make the run's key prefix differ from earlier runs'.
#[allow(clippy::disallowed_methods)]
fn wall_clock_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// A duration in whole microseconds.
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Latencies in microseconds, sorted, with nearest-rank percentiles.
struct Latencies(Vec<u64>);

impl Latencies {
    fn new(mut samples_us: Vec<u64>) -> Self {
        assert!(!samples_us.is_empty(), "no latency samples");
        samples_us.sort_unstable();
        Self(samples_us)
    }

    /// The `percent`th percentile (nearest rank), in microseconds.
    fn percentile_us(&self, percent: usize) -> u64 {
        let rank = (self.0.len() * percent).div_ceil(100).max(1);
        self.0[rank - 1]
    }

    /// The `percent`th percentile in milliseconds, for printing.
    fn percentile_ms(&self, percent: usize) -> f64 {
        self.percentile_us(percent) as f64 / US_PER_MS
    }
}

/// One timed case: how many operations, how long they took together, and each one's latency.
struct Measured {
    operations: usize,
    elapsed: Duration,
    latencies: Latencies,
}

impl Measured {
    fn ops_per_sec(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `op(task, index)` for `ops_per_task` indexes on each of [`CONCURRENCY`] tasks at once,
/// timing each call and the whole.
async fn run_concurrently<F, Fut>(ops_per_task: usize, op: F) -> Measured
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let started = now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latencies_us = Vec::with_capacity(ops_per_task);
                for index in 0..ops_per_task {
                    let sent = now();
                    op(task, index).await;
                    latencies_us.push(micros(sent.elapsed()));
                }
                latencies_us
            })
        })
        .collect();
    let mut latencies_us = Vec::with_capacity(CONCURRENCY * ops_per_task);
    for task in tasks {
        latencies_us.extend(task.await.expect("a benchmark task panicked"));
    }
    Measured {
        operations: CONCURRENCY * ops_per_task,
        elapsed: started.elapsed(),
        latencies: Latencies::new(latencies_us),
    }
}

/// The actor a throughput case works on: `<side>-r<round>-t<task>-<index>`.
fn case_actor(side: &str, round: usize, task: usize, index: usize) -> ActorId {
    ActorId::new(format!("{side}-r{round}-t{task}-{index}")).expect("a valid actor id")
}

/// One caller's keepalive stream on the raw side's lease.
type RawKeeper = Arc<tokio::sync::Mutex<(LeaseKeeper, LeaseKeepAliveStream)>>;

/// How the raw side issues a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// The transaction alone.
    Txn,
    /// A keepalive of the lease on the caller's own stream, then the transaction: the two
    /// round trips in series that the manager's acquire makes, without the manager.
    KeepAliveThenTxn,
}

/// The benchmark's connection to etcd, twice over: through the manager and directly.
struct Bench {
    options: EtcdOptions,
    prefix: String,
    ours: Arc<EtcdLeaseManager>,
    ours_node: NodeId,
    raw: Client,
    raw_node: NodeId,
    raw_lease_id: i64,
    /// One keepalive stream per caller, for [`Raw::KeepAliveThenTxn`].
    raw_keepers: Vec<RawKeeper>,
}

impl Bench {
    async fn connect(options: EtcdOptions) -> Self {
        let ours = Arc::new(manager(&options).await);
        let mut raw = Client::connect(&options.endpoints, None)
            .await
            .expect("connect the raw etcd client");
        let granted = raw
            .lease_grant(RAW_LEASE_TTL_S, None)
            .await
            .expect("grant the raw side's etcd lease");
        let mut raw_keepers = Vec::with_capacity(CONCURRENCY);
        for _ in 0..CONCURRENCY {
            // Opening the stream sends a keepalive and takes its answer.
            let (keeper, stream) = raw
                .lease_keep_alive(granted.id())
                .await
                .expect("open a keepalive stream");
            raw_keepers.push(Arc::new(tokio::sync::Mutex::new((keeper, stream))));
        }
        Self {
            prefix: options.key_prefix.clone(),
            options,
            ours,
            ours_node: NodeId::new("bench-node").unwrap(),
            raw,
            raw_node: NodeId::new("bench-raw-node").unwrap(),
            raw_lease_id: granted.id(),
            raw_keepers,
        }
    }

    /// Acquires, renews or releases through the manager on every task's actors of `round`.
    async fn ours(&self, op: Op, side: &'static str, round: usize, ops: usize) -> Measured {
        let (manager, node) = (Arc::clone(&self.ours), self.ours_node.clone());
        run_concurrently(ops, move |task, index| {
            let (manager, node) = (Arc::clone(&manager), node.clone());
            async move {
                let actor = case_actor(side, round, task, index);
                match op {
                    Op::Acquire => manager.acquire(&actor, &node).await,
                    Op::Renew => manager.renew(&actor, &node).await,
                    Op::Release => manager.release(&actor, &node).await,
                }
                .unwrap_or_else(|error| panic!("{op:?} of {actor} failed: {error}"));
            }
        })
        .await
    }

    /// The same transactions as [`Bench::ours`], issued directly with `etcd_client`.
    async fn raw(&self, op: Op, side: &'static str, round: usize, ops: usize) -> Measured {
        self.raw_as(Raw::Txn, op, side, round, ops).await
    }

    /// The raw side's transactions, issued as `raw` says.
    async fn raw_as(
        &self,
        raw: Raw,
        op: Op,
        side: &'static str,
        round: usize,
        ops: usize,
    ) -> Measured {
        let kv = self.raw.kv_client();
        let keepers = self.raw_keepers.clone();
        let (prefix, node, lease_id) = (
            self.prefix.clone(),
            self.raw_node.clone(),
            self.raw_lease_id,
        );
        run_concurrently(ops, move |task, index| {
            let keeper = Arc::clone(&keepers[task]);
            let mut kv = kv.clone();
            let actor = case_actor(side, round, task, index);
            let key = format!("{prefix}{actor}").into_bytes();
            let txn = match op {
                Op::Acquire => acquire_txn(&key, &node, lease_id),
                Op::Renew => renew_txn(&key, &node, lease_id),
                Op::Release => release_txn(&key, &node),
            };
            async move {
                if raw == Raw::KeepAliveThenTxn {
                    let (keeper, stream) = &mut *keeper.lock().await;
                    keeper.keep_alive().await.expect("send a keepalive");
                    let answer = stream.message().await.expect("a keepalive answer");
                    assert!(
                        answer.is_some_and(|a| a.ttl() > 0),
                        "the raw lease is alive"
                    );
                }
                let response = kv.txn(txn).await.expect("a raw transaction failed");
                assert!(response.succeeded(), "raw {op:?} of {actor} was refused");
            }
        })
        .await
    }
}

/// The three lease operations measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Acquire,
    Renew,
    Release,
}

impl Op {
    const ALL: [Op; 3] = [Op::Acquire, Op::Renew, Op::Release];

    fn name(self) -> &'static str {
        match self {
            Op::Acquire => "acquire",
            Op::Renew => "renew",
            Op::Release => "release",
        }
    }
}

/// The manager's acquire transaction, as `etcd::ops::acquire_txn` builds it: "if the key is
/// absent, create it attached to the session lease, then read it; else read it".
fn acquire_txn(key: &[u8], node: &NodeId, lease_id: i64) -> Txn {
    let put_options = PutOptions::new().with_lease(lease_id);
    Txn::new()
        .when([Compare::version(key, CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(key, node.as_str(), Some(put_options)),
            TxnOp::get(key, None),
        ])
        .or_else([TxnOp::get(key, None)])
}

/// The manager's renew transaction (without the session keepalive that follows it): "if the
/// key names the caller and hangs off its session, rewrite it and read it; else read it".
fn renew_txn(key: &[u8], node: &NodeId, lease_id: i64) -> Txn {
    Txn::new()
        .when([
            Compare::value(key, CompareOp::Equal, node.as_str()),
            Compare::lease(key, CompareOp::Equal, lease_id),
        ])
        .and_then([
            TxnOp::put(
                key,
                node.as_str(),
                Some(PutOptions::new().with_lease(lease_id)),
            ),
            TxnOp::get(key, None),
        ])
        .or_else([TxnOp::get(key, None)])
}

/// The manager's release transaction: "if the key names the caller, delete it returning the
/// deleted key; else read it".
fn release_txn(key: &[u8], node: &NodeId) -> Txn {
    Txn::new()
        .when([Compare::value(key, CompareOp::Equal, node.as_str())])
        .and_then([TxnOp::delete(
            key,
            Some(DeleteOptions::new().with_prev_key()),
        )])
        .or_else([TxnOp::get(key, None)])
}

/// A manager on `options` with the benchmark's lease duration.
async fn manager(options: &EtcdOptions) -> EtcdLeaseManager {
    let lease = LeaseConfig::new(BENCH_LEASE_DURATION_MS).expect("a valid lease duration");
    EtcdLeaseManager::connect(options.clone().with_lease_config(lease))
        .await
        .expect("connect the lease manager")
}

/// One round of the throughput cases, ours and raw interleaved per operation.
struct Round {
    ours: Vec<Measured>,
    raw: Vec<Measured>,
    /// The raw acquire preceded by a keepalive ([`Raw::KeepAliveThenTxn`]).
    raw_keep_alive_acquire: Option<Measured>,
    /// Keepalives the manager sent during each of its cases.
    ours_keep_alives: Vec<u64>,
}

/// Runs every throughput case once, on actors of `round`.
async fn throughput_round(bench: &Bench, round: usize) -> Round {
    let mut result = Round {
        ours: Vec::new(),
        raw: Vec::new(),
        raw_keep_alive_acquire: None,
        ours_keep_alives: Vec::new(),
    };
    for op in Op::ALL {
        // Alternate which side goes first, so neither always runs right after the other's
        // writes.
        let ours_first = round.is_multiple_of(2);
        if !ours_first {
            result
                .raw
                .push(bench.raw(op, "raw", round, OPS_PER_TASK).await);
        }
        let before = bench.ours.stats();
        result
            .ours
            .push(bench.ours(op, "ours", round, OPS_PER_TASK).await);
        result
            .ours_keep_alives
            .push(bench.ours.stats().keep_alives_sent - before.keep_alives_sent);
        if ours_first {
            result
                .raw
                .push(bench.raw(op, "raw", round, OPS_PER_TASK).await);
        }
        if op == Op::Acquire {
            let raw = Raw::KeepAliveThenTxn;
            let measured = bench.raw_as(raw, op, "raw-ka", round, OPS_PER_TASK).await;
            result.raw_keep_alive_acquire = Some(measured);
        }
    }
    result
}

/// The fastest of the rounds' measurements of one case.
fn best<'a>(rounds: &'a [Round], pick: impl Fn(&'a Round) -> &'a Measured) -> &'a Measured {
    rounds
        .iter()
        .map(pick)
        .max_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()))
        .expect("at least one round")
}

/// Prints one line of the throughput table.
fn print_row(case: &str, measured: &Measured) {
    println!(
        "{case:<40} {:>7} {:>10.0} {:>9.2} {:>9.2}",
        measured.operations,
        measured.ops_per_sec(),
        measured.latencies.percentile_ms(50),
        measured.latencies.percentile_ms(99)
    );
}

/// Measures and prints the throughput table and the acquire ratio.
async fn throughput(bench: &Bench) {
    // Warm up both sides: connections, the node's session, etcd's caches.
    for op in Op::ALL {
        bench.ours(op, "warm-ours", 0, WARM_UP_OPS_PER_TASK).await;
        bench.raw(op, "warm-raw", 0, WARM_UP_OPS_PER_TASK).await;
    }
    let mut rounds = Vec::with_capacity(ROUNDS_COUNT);
    for round in 0..ROUNDS_COUNT {
        rounds.push(throughput_round(bench, round).await);
    }
    println!(
        "throughput at concurrency {CONCURRENCY} ({CONCURRENCY} tasks, distinct actors, \
         {} ops per case, best of {ROUNDS_COUNT} rounds)",
        CONCURRENCY * OPS_PER_TASK
    );
    println!(
        "{:<40} {:>7} {:>10} {:>9} {:>9}",
        "case", "ops", "ops/s", "p50 ms", "p99 ms"
    );
    for (i, op) in Op::ALL.into_iter().enumerate() {
        print_row(
            &format!("{} (EtcdLeaseManager, one node)", op.name()),
            best(&rounds, |r| &r.ours[i]),
        );
        print_row(
            &format!("{} (raw etcd_client txn)", op.name()),
            best(&rounds, |r| &r.raw[i]),
        );
        if op == Op::Acquire {
            print_row(
                "acquire (raw keepalive, then txn)",
                best(&rounds, raw_keep_alive_acquire),
            );
        }
    }
    let keep_alives: Vec<String> = Op::ALL
        .into_iter()
        .enumerate()
        .map(|(i, op)| {
            let sent: u64 = rounds.iter().map(|r| r.ours_keep_alives[i]).sum();
            let per_op = sent as f64 / (ROUNDS_COUNT * CONCURRENCY * OPS_PER_TASK) as f64;
            format!("{} {per_op:.2}", op.name())
        })
        .collect();
    println!(
        "manager keepalives per operation (coalesced across the node's callers): {}",
        keep_alives.join(", ")
    );
    let acquire = Op::ALL.iter().position(|&op| op == Op::Acquire).unwrap();
    let ratio = best(&rounds, |r| &r.ours[acquire]).ops_per_sec()
        / best(&rounds, |r| &r.raw[acquire]).ops_per_sec();
    let per_round: Vec<String> = rounds
        .iter()
        .map(|r| {
            format!(
                "{:.2}",
                r.ours[acquire].ops_per_sec() / r.raw[acquire].ops_per_sec()
            )
        })
        .collect();
    let verdict = if ratio >= RAW_RATIO_TARGET {
        "meets"
    } else {
        "MISSES"
    };
    println!(
        "acquire rate ours/raw: {ratio:.2} (rounds: {}): {verdict} the {RAW_RATIO_TARGET} target",
        per_round.join(", ")
    );
    let two_trips = best(&rounds, |r| &r.ours[acquire]).ops_per_sec()
        / best(&rounds, raw_keep_alive_acquire).ops_per_sec();
    println!(
        "acquire rate ours/(raw keepalive, then txn): {two_trips:.2}: the manager sends the \
         session keepalive alongside its transaction, not before it"
    );
}

/// The raw keepalive-then-acquire case of a round.
fn raw_keep_alive_acquire(round: &Round) -> &Measured {
    let measured = round.raw_keep_alive_acquire.as_ref();
    measured.expect("every round measures it")
}

/// Measures and prints what renewing a node holding [`NODE_ACTORS_COUNT`] actors costs.
async fn renewal_cost(options: &EtcdOptions) {
    let manager = Arc::new(manager(options).await);
    let node = NodeId::new("bench-big-node").unwrap();
    let ops_per_task = NODE_ACTORS_COUNT / CONCURRENCY;
    assert_eq!(ops_per_task * CONCURRENCY, NODE_ACTORS_COUNT);
    let acquiring = {
        let (manager, node) = (Arc::clone(&manager), node.clone());
        run_concurrently(ops_per_task, move |task, index| {
            let (manager, node) = (Arc::clone(&manager), node.clone());
            async move {
                let actor = case_actor("big", 0, task, index);
                manager.acquire(&actor, &node).await.expect("acquire");
            }
        })
    };
    let acquired = acquiring.await;
    let session = manager.node_session(&node).expect("the node has a session");
    // Ask etcd how many keys hang off the node's one session lease.
    let mut raw = Client::connect(&options.endpoints, None).await.unwrap();
    let attached = raw
        .lease_time_to_live(
            session.lease_id,
            Some(LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .expect("read the session's keys")
        .keys()
        .len();
    assert_eq!(
        attached, NODE_ACTORS_COUNT,
        "every actor hangs off the session"
    );
    let mut latencies_us = Vec::with_capacity(RENEWAL_ROUNDS_COUNT);
    let mut per_round: Vec<EtcdStats> = Vec::with_capacity(RENEWAL_ROUNDS_COUNT);
    for _ in 0..RENEWAL_ROUNDS_COUNT {
        let before = manager.stats();
        let sent = now();
        let renewed = manager.keep_alive_node(&node).await.expect("renewal round");
        latencies_us.push(micros(sent.elapsed()));
        assert!(renewed.is_some(), "the session is alive");
        let after = manager.stats();
        per_round.push(stats_delta(before, after));
    }
    let keep_alives_max = per_round.iter().map(|s| s.keep_alives_sent).max().unwrap();
    let keep_alives_total: u64 = per_round.iter().map(|s| s.keep_alives_sent).sum();
    let grants_total: u64 = per_round.iter().map(|s| s.sessions_granted).sum();
    let latencies = Latencies::new(latencies_us);
    let revoking = now();
    assert!(manager.revoke_node(&node).await.expect("revoke the node"));
    let revoke_ms = micros(revoking.elapsed()) as f64 / US_PER_MS;
    let left = raw
        .get(
            format!("{}big-", options.key_prefix),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count();
    assert_eq!(left, 0, "revoking the session deleted every key");
    let verdict = if keep_alives_max <= KEEPALIVES_PER_RENEWAL_TARGET && grants_total == 0 {
        "meets"
    } else {
        "MISSES"
    };
    println!(
        "one node holding {NODE_ACTORS_COUNT} actors (acquired at concurrency {CONCURRENCY} in \
         {:.1} s, {:.0}/s; {attached} keys on its one session lease)",
        acquired.elapsed.as_secs_f64(),
        acquired.ops_per_sec()
    );
    println!(
        "  renewal round (keep_alive_node), {RENEWAL_ROUNDS_COUNT} rounds: {keep_alives_total} \
         keepalives and {grants_total} session grants in all, at most {keep_alives_max} \
         keepalive per round: {verdict} the one-keepalive target; latency p50 {:.2} ms, \
         p99 {:.2} ms",
        latencies.percentile_ms(50),
        latencies.percentile_ms(99)
    );
    println!("  revoke_node released all {NODE_ACTORS_COUNT} in one request: {revoke_ms:.1} ms");
}

/// The change in a manager's counters between two readings.
fn stats_delta(before: EtcdStats, after: EtcdStats) -> EtcdStats {
    let mut delta = after;
    delta.sessions_granted -= before.sessions_granted;
    delta.keep_alives_sent -= before.keep_alives_sent;
    delta
}

/// Timings of one handover, in microseconds.
struct Handover {
    /// From the start of A's release call to B's grant.
    release_to_grant_us: u64,
    /// A's release call alone.
    release_call_us: u64,
}

/// One handover: A acquires, B starts waiting, A releases, B is granted and releases.
async fn handover_round(a: &EtcdLeaseManager, b: &Arc<EtcdLeaseManager>, round: usize) -> Handover {
    let actor = ActorId::new(format!("handover-{round}")).unwrap();
    let (node_a, node_b) = (
        NodeId::new("bench-a").unwrap(),
        NodeId::new("bench-b").unwrap(),
    );
    let held = a.acquire(&actor, &node_a).await.expect("A acquires");
    let waiting = {
        let (b, actor, node_b) = (Arc::clone(b), actor.clone(), node_b.clone());
        tokio::spawn(async move {
            let lease = b.acquire_waiting(&actor, &node_b, HANDOVER_WAIT_MS).await;
            (lease, now())
        })
    };
    sleep_ms(HANDOVER_SETTLE_MS).await;
    let releasing = now();
    a.release(&actor, &node_a).await.expect("A releases");
    let release_call_us = micros(releasing.elapsed());
    let (granted, granted_at) = waiting.await.expect("B's task panicked");
    let granted = granted.expect("B acquires after A's release");
    assert_eq!(granted.holder, node_b);
    assert!(
        granted.fencing_token > held.fencing_token,
        "tokens increase"
    );
    b.release(&actor, &node_b).await.expect("B releases");
    Handover {
        release_to_grant_us: micros(granted_at.saturating_duration_since(releasing)),
        release_call_us,
    }
}

/// Measures and prints the handover latency after a voluntary release.
async fn handover(options: &EtcdOptions) {
    let a = manager(options).await;
    let b = Arc::new(manager(options).await);
    // One untimed round grants both nodes' sessions.
    handover_round(&a, &b, HANDOVER_ROUNDS_COUNT).await;
    let mut handovers = Vec::with_capacity(HANDOVER_ROUNDS_COUNT);
    for round in 0..HANDOVER_ROUNDS_COUNT {
        handovers.push(handover_round(&a, &b, round).await);
    }
    let to_grant = Latencies::new(handovers.iter().map(|h| h.release_to_grant_us).collect());
    let release = Latencies::new(handovers.iter().map(|h| h.release_call_us).collect());
    let verdict = if to_grant.percentile_us(50) < HANDOVER_P50_TARGET_US {
        "meets"
    } else {
        "MISSES"
    };
    println!(
        "handover after a voluntary release, {HANDOVER_ROUNDS_COUNT} rounds (A releases, B \
         waits in acquire_waiting on another manager)"
    );
    println!(
        "  release call start to B's grant: p50 {:.2} ms, p99 {:.2} ms: {verdict} the p50 < \
         {:.0} ms target (A's release call alone: p50 {:.2} ms, p99 {:.2} ms)",
        to_grant.percentile_ms(50),
        to_grant.percentile_ms(99),
        HANDOVER_P50_TARGET_US as f64 / US_PER_MS,
        release.percentile_ms(50),
        release.percentile_ms(99)
    );
    for node in ["bench-a", "bench-b"] {
        let node = NodeId::new(node).unwrap();
        a.revoke_node(&node).await.expect("revoke");
        b.revoke_node(&node).await.expect("revoke");
    }
}

/// Deletes everything the run wrote and revokes what it granted.
async fn clean_up(bench: &Bench) {
    bench
        .ours
        .revoke_node(&bench.ours_node)
        .await
        .expect("revoke the benchmark node");
    let mut raw = bench.raw.clone();
    raw.lease_revoke(bench.raw_lease_id)
        .await
        .expect("revoke the raw lease");
    raw.delete(
        bench.prefix.as_str(),
        Some(DeleteOptions::new().with_prefix()),
    )
    .await
    .expect("delete the run's prefix");
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is ignored.
    let options = EtcdOptions::from_env().expect("KELPIE_ETCD_ENDPOINTS is malformed");
    let Some(options) = options else {
        println!(
            "etcd benchmark skipped: {ETCD_ENDPOINTS_ENV} is not set (run it as \
             scripts/with-etcd cargo bench -p kelpie-lease --bench etcd)"
        );
        return;
    };
    let prefix = format!("/kelpie-bench/{}-{}/", wall_clock_ms(), std::process::id());
    let options = options
        .with_key_prefix(prefix.clone())
        .with_connect_timeout_ms(ETCD_TIMEOUT_MS)
        .with_request_timeout_ms(ETCD_TIMEOUT_MS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "etcd lease benchmark: {} under {prefix} ({cores} cores, shared with etcd when it runs \
         here)",
        options.endpoints.join(",")
    );
    let run = async {
        let bench = Bench::connect(options.clone()).await;
        throughput(&bench).await;
        renewal_cost(&bench.options).await;
        handover(&bench.options).await;
        clean_up(&bench).await;
    };
    // The raw client's requests have no timeout of their own; a stuck etcd fails the run
    // instead of hanging it.
    let limit = Duration::from_millis(RUN_TIMEOUT_MS);
    runtime
        .block_on(async { tokio::time::timeout(limit, run).await })
        .unwrap_or_else(|_| panic!("the etcd benchmark did not finish in {RUN_TIMEOUT_MS} ms"));
}
