//! Crash test: a child process acquires, renews and releases leases on a SQLite file and
//! reports every acknowledged operation; the parent SIGKILLs it at a random moment, reopens
//! the file and checks that every acknowledged operation is there, that no fencing token went
//! backwards, and that `PRAGMA integrity_check` is ok. Repeated
//! [`CRASH_ITERATIONS_DEFAULT`] times, or `KELPIE_CRASH_ITERATIONS`; the seed is
//! `KELPIE_CRASH_SEED` (printed, so a failure can be replayed).
//!
//! The child is this same test binary, re-invoked to run only the `#[ignore]`d
//! `child_worker_entry`, which does nothing unless [`CHILD_DB_ENV`] names a file.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use kelpie_core::limits::LEASE_DURATION_MS_MIN;
use kelpie_core::{ActorId, NodeId};
use kelpie_lease::{backend::LeaseRecord, backend::SqliteLeaseStore};
use kelpie_lease::{backend::LeaseStore, LeaseConfig, LeaseManager, SqliteLeaseManager};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Kill-and-check rounds in a default run.
const CRASH_ITERATIONS_DEFAULT: u32 = 50;
/// Longest a child runs before it is killed, after it reported ready.
const KILL_DELAY_MS_MAX: u64 = 100;
/// Shortest such run: long enough that most rounds kill the child mid-work.
const KILL_DELAY_MS_MIN: u64 = 2;
/// Longest the parent waits for a child to open the store.
const CHILD_READY_TIMEOUT_MS: u64 = 30_000;
/// A child left running by a parent that died exits on its own after this long.
const CHILD_LIFETIME_MS_MAX: u64 = 30_000;
/// Actors the child works on, each from its own task so that operations on one actor are
/// acknowledged in the order they were applied, while the tasks together fill group commits.
const ACTOR_COUNT: usize = 6;
/// Nodes the child acts as, so that leases change hands and tokens grow.
const NODE_COUNT: usize = 2;

const CHILD_DB_ENV: &str = "KELPIE_CRASH_CHILD_DB";
const CHILD_SEED_ENV: &str = "KELPIE_CRASH_CHILD_SEED";
const SEED_DEFAULT: u64 = 0x6b65_6c70_6965;

/// One acknowledged operation, as the child reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    op: String,
    actor: String,
    node: String,
    token: u64,
    expires_at_ms: u64,
}

impl Ack {
    fn parse(line: &str) -> Option<Ack> {
        let mut fields = line.strip_prefix("ACK ")?.split(' ');
        let mut next = || fields.next().map(str::to_string);
        Some(Ack {
            op: next()?,
            actor: next()?,
            node: next()?,
            token: next()?.parse().ok()?,
            expires_at_ms: next()?.parse().ok()?,
        })
    }
}

#[test]
#[ignore = "the child process of crash_kill_reopen_check; runs only when re-invoked by it"]
fn child_worker_entry() {
    let Ok(db) = std::env::var(CHILD_DB_ENV) else {
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(child_work(Path::new(&db), seed));
}

async fn child_work(db: &Path, seed: u64) {
    let store = SqliteLeaseStore::open(db).unwrap();
    let config = LeaseConfig::new(LEASE_DURATION_MS_MIN).unwrap();
    let manager = Arc::new(SqliteLeaseManager::new(store, config));
    report("READY");
    let tasks: Vec<_> = (0..ACTOR_COUNT)
        .map(|index| {
            let manager = Arc::clone(&manager);
            tokio::spawn(child_actor_loop(manager, index, seed))
        })
        .collect();
    // Ending the process with the runtime's tasks still running is fine: the parent kills
    // it long before this, and a stray child must not outlive a dead parent for long.
    tokio::time::timeout(Duration::from_millis(CHILD_LIFETIME_MS_MAX), async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await
    .ok();
    std::process::exit(0);
}

async fn child_actor_loop(manager: Arc<SqliteLeaseManager>, index: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9));
    let actor = ActorId::new(format!("actor-{index}")).unwrap();
    loop {
        let node = NodeId::new(format!("node-{}", rng.gen_range(0..NODE_COUNT))).unwrap();
        let (op, result) = match rng.gen_range(0..10) {
            0..=4 => ("acquire", manager.acquire(&actor, &node).await),
            5..=7 => ("renew", manager.renew(&actor, &node).await),
            _ => ("release", manager.release(&actor, &node).await),
        };
        // Refusals write nothing, so only granted, renewed and released leases are reported.
        if let Ok(lease) = result {
            let line = format!(
                "ACK {op} {actor} {node} {} {}",
                lease.fencing_token, lease.expires_at_ms
            );
            report(&line);
        }
    }
}

/// Writes one line and flushes it, so that it is in the pipe before the next operation.
fn report(line: &str) {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").unwrap();
    stdout.flush().unwrap();
}

/// Kills the child when dropped, so a failing parent leaves no process behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(db: &Path, seed: u64) -> (KillOnDrop, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_worker_entry", "--exact", "--nocapture", "--ignored"])
        .args(["--test-threads", "1"])
        .env(CHILD_DB_ENV, db)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (KillOnDrop(child), received)
}

// Real processes run on real time: the parent must let the child work for a while.
#[allow(clippy::disallowed_methods)]
fn sleep_ms(duration_ms: u64) {
    std::thread::sleep(Duration::from_millis(duration_ms));
}

/// Runs one child until a random moment, kills it, and returns what it acknowledged.
fn run_and_kill(db: &Path, seed: u64, kill_delay_ms: u64) -> Vec<Ack> {
    let (mut child, lines) = spawn_child(db, seed);
    let timeout = Duration::from_millis(CHILD_READY_TIMEOUT_MS);
    loop {
        let line = lines
            .recv_timeout(timeout)
            .expect("child never became ready");
        // libtest prints "test child_worker_entry ... " without a newline before it.
        if line.ends_with("READY") {
            break;
        }
    }
    sleep_ms(kill_delay_ms);
    // `kill` is SIGKILL on unix: no destructor, no flush, no checkpoint runs in the child.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // The reader thread ends at end of file; every line written before the kill is there.
    lines.iter().filter_map(|line| Ack::parse(&line)).collect()
}

/// What the parent knows of one actor across rounds.
#[derive(Debug, Default)]
struct ActorHistory {
    /// The largest token acknowledged or seen on disk so far.
    token_floor: u64,
}

/// Checks the reopened store against the acknowledgements of the round just killed.
fn check_round(
    round: u32,
    acks: &[Ack],
    records: &BTreeMap<String, LeaseRecord>,
    history: &mut BTreeMap<String, ActorHistory>,
) {
    let mut last_acks: BTreeMap<&str, &Ack> = BTreeMap::new();
    for ack in acks {
        let floor = history.entry(ack.actor.clone()).or_default();
        assert!(
            ack.token >= floor.token_floor,
            "round {round}: acknowledged token went backwards: {ack:?} after {}",
            floor.token_floor
        );
        floor.token_floor = ack.token;
        last_acks.insert(&ack.actor, ack);
    }
    for (actor, ack) in &last_acks {
        let record = records
            .get(*actor)
            .unwrap_or_else(|| panic!("round {round}: acknowledged {ack:?} but no record"));
        let token = record.fencing_token.0;
        assert!(
            token >= ack.token,
            "round {round}: {ack:?} lost: {record:?}"
        );
        if token > ack.token {
            continue; // A later, unreported acquire by some node took over.
        }
        let holder = record.holder.as_ref().map(NodeId::as_str);
        match ack.op.as_str() {
            // Only the same holder keeps the token: it may have renewed or released since.
            "acquire" | "renew" => {
                assert!(
                    holder.is_none() || holder == Some(ack.node.as_str()),
                    "round {round}: {ack:?} but the holder changed without a new token: \
                     {record:?}"
                );
                if holder.is_some() {
                    assert!(
                        record.expires_at_ms >= ack.expires_at_ms,
                        "round {round}: {ack:?} but the expiry went back: {record:?}"
                    );
                }
            }
            "release" => assert!(
                holder.is_none(),
                "round {round}: {ack:?} but the record is held with the same token: {record:?}"
            ),
            other => panic!("unknown op {other}"),
        }
    }
    for (actor, record) in records {
        let floor = history.entry(actor.clone()).or_default();
        assert!(
            record.fencing_token.0 >= floor.token_floor,
            "round {round}: {actor}'s token went backwards on disk: {record:?}, had seen {}",
            floor.token_floor
        );
        floor.token_floor = record.fencing_token.0;
    }
}

fn integrity_check(db: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(result, "ok", "integrity_check of {}", db.display());
}

fn reopen_and_read(db: &Path) -> BTreeMap<String, LeaseRecord> {
    let store = SqliteLeaseStore::open(db).unwrap();
    let snapshot = futures::executor::block_on(store.scan()).unwrap();
    snapshot
        .records
        .into_iter()
        .map(|(actor, record)| (actor.as_str().to_string(), record))
        .collect()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).map_or(default, |value| {
        value.parse().unwrap_or_else(|_| panic!("{name}={value:?}"))
    })
}

#[test]
fn crash_kill_reopen_check() {
    let iterations = env_or("KELPIE_CRASH_ITERATIONS", CRASH_ITERATIONS_DEFAULT);
    let seed = env_or("KELPIE_CRASH_SEED", SEED_DEFAULT);
    println!("crash test: {iterations} rounds, KELPIE_CRASH_SEED={seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("leases.db");
    let mut history = BTreeMap::new();
    let (mut acks_total, mut rounds_with_acks) = (0, 0);
    for round in 0..iterations {
        let kill_delay_ms = rng.gen_range(KILL_DELAY_MS_MIN..=KILL_DELAY_MS_MAX);
        let acks = run_and_kill(&db, rng.gen(), kill_delay_ms);
        integrity_check(&db);
        let records = reopen_and_read(&db);
        check_round(round, &acks, &records, &mut history);
        acks_total += acks.len();
        rounds_with_acks += usize::from(!acks.is_empty());
    }
    let max_token = history.values().map(|h| h.token_floor).max().unwrap_or(0);
    println!(
        "crash test: {iterations} kills, {acks_total} acknowledged operations checked, \
         {rounds_with_acks} rounds killed mid-work, largest token {max_token}"
    );
    assert!(
        rounds_with_acks * 2 >= iterations as usize,
        "most rounds should be killed after some work, or the test proves little"
    );
}
